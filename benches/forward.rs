//! Forward throughput of `--model` runs (filled in by the model-runner work; see docs/model.md).

fn main() {
    eprintln!("forward bench: not written yet");
}
