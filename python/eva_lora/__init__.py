"""eva for PyTorch scripts: PEFT's EVA initialization of LoRA adapters (``peft.tuners.lora.eva``)
on eva's exact, distributed statistics. Change the import and keep the call:

    from eva_lora import initialize_lora_eva_weights
"""

from .eva import (
    EvaError,
    forward_fn_dict,
    get_eva_state_dict,
    initialize_lora_eva_weights,
    prepare_layer_inputs_fn_language_modeling,
    prepare_model_inputs_fn_language_modeling,
)

__all__ = [
    "EvaError",
    "forward_fn_dict",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "prepare_layer_inputs_fn_language_modeling",
    "prepare_model_inputs_fn_language_modeling",
]
