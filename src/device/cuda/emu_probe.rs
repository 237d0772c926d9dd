//! The emulated device's probe (feature `cuda-emu`): no library to load; `EVA_EMU_DEVICES`
//! emulated GPUs (default 1).

use crate::device::error::DeviceError;

/// The number of emulated GPUs.
pub fn devices() -> Result<usize, DeviceError> {
    Ok(super::runtime::device_count())
}
