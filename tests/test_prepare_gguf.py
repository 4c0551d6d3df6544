"""The GGUF preparer on a tiny qwen2 GGUF written here: parts joined in order and checked, the
converted folder loads and generates with transformers, and a wrong size, checksum or part order
is refused naming expected and actual values."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from recipe.atropos.models import prepare_gguf
from recipe.atropos.models.make_tiny_model import CHATML_TEMPLATE

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_vocab() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet()) + ["Ġt", "he"] + SPECIALS


def write_tiny_gguf(path: str) -> dict[str, np.ndarray]:
    """A random qwen2 model with a byte-level BPE tokenizer and ChatML, in float32 tensors."""
    tokens = byte_level_vocab()
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_name("tiny-qwen2")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(["Ġ t", "h e"])  # transformers reads a one-item list as a string
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_chat_template(CHATML_TEMPLATE)

    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.attn_q.bias": (HIDDEN,),
            f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_k.bias": (KV_HEADS * head_dim,),
            f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_v.bias": (KV_HEADS * head_dim,),
            f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
    tensors = {name: rng.normal(0, 0.2, shape).astype(np.float32) for name, shape in shapes.items()}
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    path = str(folder / "tiny.gguf")
    tensors = write_tiny_gguf(path)
    data = Path(path).read_bytes()
    cuts = [0, len(data) // 3, len(data) // 3 + 1000, len(data)]  # unequal parts
    parts = []
    for i in range(3):
        part = folder / f"part{i + 1:02d}.bin"
        part.write_bytes(data[cuts[i] : cuts[i + 1]])
        parts.append(str(part))
    return {
        "path": path,
        "parts": parts,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "tensors": tensors,
    }


def test_join_parts_streams_them_in_order(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_gguf, "CHUNK_BYTES", 4096)  # many chunks per part
    joined = str(tmp_path / "joined.gguf")
    digest = prepare_gguf.join_parts(tiny_gguf["parts"], joined)
    assert digest == prepare_gguf.Digest(tiny_gguf["size"], tiny_gguf["sha256"])
    assert Path(joined).read_bytes() == Path(tiny_gguf["path"]).read_bytes()


def test_parts_convert_to_a_folder_that_loads_and_generates(tiny_gguf, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = str(tmp_path / "model")
    prepare_gguf.prepare(
        tiny_gguf["parts"], out, size=tiny_gguf["size"], sha256=tiny_gguf["sha256"], work_dir=str(tmp_path)
    )
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the joined temporary file is gone

    config = Path(out, "config.json").read_text()
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    vocab = byte_level_vocab()
    assert model.config.architectures == ["Qwen2ForCausalLM"]
    assert model.dtype == torch.bfloat16
    assert tokenizer.eos_token == "<|im_end|>" and model.config.eos_token_id == vocab.index("<|im_end|>")
    assert tokenizer.pad_token == "<|endoftext|>"
    generation = GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == [vocab.index("<|im_end|>"), vocab.index("<|endoftext|>")]
    # the weights are the GGUF's, rounded to bf16
    embed = torch.from_numpy(tiny_gguf["tensors"]["token_embd.weight"])
    torch.testing.assert_close(model.model.embed_tokens.weight.float(), embed.bfloat16().float())

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == prompt
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids.shape[1]


def test_a_single_gguf_file_is_checked_and_kept(tiny_gguf, tmp_path):
    kept = str(tmp_path / "kept.gguf")
    prepare_gguf.prepare([tiny_gguf["path"]], str(tmp_path / "model"), sha256=tiny_gguf["sha256"], keep_gguf=kept)
    assert prepare_gguf.file_digest(kept).sha256 == tiny_gguf["sha256"]


def test_wrong_sha256_is_refused_naming_both_values(tiny_gguf, tmp_path):
    wrong = "0" * 64
    with pytest.raises(prepare_gguf.GGUFCheckError) as error:
        prepare_gguf.prepare(tiny_gguf["parts"], str(tmp_path / "model"), size=tiny_gguf["size"], sha256=wrong)
    message = str(error.value)
    assert "sha256 mismatch" in message and wrong in message and tiny_gguf["sha256"] in message
    assert tiny_gguf["parts"][0] in message
    assert not (tmp_path / "model").exists()


def test_wrong_size_is_refused_naming_both_values(tiny_gguf, tmp_path):
    with pytest.raises(prepare_gguf.GGUFCheckError) as error:
        prepare_gguf.prepare(tiny_gguf["parts"][:2], str(tmp_path / "model"), size=tiny_gguf["size"])
    message = str(error.value)
    truncated = sum(os.path.getsize(p) for p in tiny_gguf["parts"][:2])
    assert f"expected {tiny_gguf['size']} bytes, got {truncated} bytes" in message
    assert not (tmp_path / "model").exists()


def test_parts_out_of_order_fail_the_checksum(tiny_gguf, tmp_path):
    shuffled = [tiny_gguf["parts"][i] for i in (1, 0, 2)]
    with pytest.raises(prepare_gguf.GGUFCheckError, match="sha256 mismatch.*out of order"):
        prepare_gguf.prepare(shuffled, str(tmp_path / "model"), size=tiny_gguf["size"], sha256=tiny_gguf["sha256"])


def test_cli_refuses_a_mismatch_with_a_clear_message(tiny_gguf, tmp_path):
    wrong = "f" * 64
    command = [sys.executable, "-m", "recipe.atropos.models.prepare_gguf", "--out", str(tmp_path / "model")]
    result = subprocess.run(
        command + ["--parts", *tiny_gguf["parts"], "--sha256", wrong],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"expected {wrong}, got {tiny_gguf['sha256']}" in result.stderr


def test_package_parts_are_found_in_installed_distributions(tiny_gguf, tmp_path, monkeypatch):
    """Each part as the one data file of an installed distribution (a dist-info with its RECORD)."""
    for i, part in enumerate(tiny_gguf["parts"], start=1):
        package = f"tinyparts_{i}"
        (tmp_path / package / "data").mkdir(parents=True)
        (tmp_path / package / "data" / f"part{i:02d}.bin").write_bytes(Path(part).read_bytes())
        info = tmp_path / f"{package}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tinyparts-{i}\nVersion: 0.1\n")
        (info / "RECORD").write_text(f"{package}/__init__.py,,\n{package}/data/part{i:02d}.bin,,\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    parts = [prepare_gguf.package_file(f"tinyparts-{i}") for i in (1, 2, 3)]
    assert prepare_gguf.join_parts(parts, None).sha256 == tiny_gguf["sha256"]
    with pytest.raises(prepare_gguf.GGUFCheckError, match="tinyparts-9 is not installed"):
        prepare_gguf.package_file("tinyparts-9")
