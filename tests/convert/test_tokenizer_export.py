"""Exported tokenizers load with AutoTokenizer and give megalm's ids; eos is megalm's EOD."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

SAMPLES = ["Once upon a time", "  two  spaces\tand a tab\nnewline", "héllo wörld 日本語 🙂",
           "x = f(a, b)  # 12345", "<|endoftext|> as text", "ﬁ ① Ａ", ""]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import pydoc_data.topics

    path = tmp_path_factory.mktemp("tok") / "corpus.txt"
    path.write_text("\n".join(sorted(pydoc_data.topics.topics.values()))[:400_000], encoding="utf-8")
    return path


def _trained(kind, corpus, tmp):
    if kind == "byte":
        return ""
    if kind.startswith("sp_"):
        import sentencepiece as spm

        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp / kind), model_type=kind[3:],
                                       vocab_size=600, character_coverage=1.0, byte_fallback=True,
                                       num_threads=1, minloglevel=2)
        return str(tmp / f"{kind}.model")
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(corpus)], vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save(str(tmp / "bpe.json"))
    return str(tmp / "bpe.json")


@pytest.mark.parametrize("kind", ["byte", "sp_bpe", "sp_unigram", "bytelevel"])
def test_round_trip_ids(kind, corpus, tmp_path):
    from megalm.convert.hf_tokenizer import export_tokenizer, tokenizer_from_hf_dir
    from megalm.data.tokenizer import build_tokenizer

    kind_name = {"byte": "byte", "bytelevel": "hf"}.get(kind, "sentencepiece")
    ours = build_tokenizer(kind_name, _trained(kind, corpus, tmp_path))
    export_tokenizer(ours, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.eos_token_id == ours.eod
    for text in SAMPLES:
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.decode(ids) == ours.decode(ids)
    back, _ = tokenizer_from_hf_dir(tmp_path / "hf", tmp_path / "back")
    assert back == kind_name


def test_byte_tokenizer_maps_every_byte_to_its_id(tmp_path):
    from tokenizers import Tokenizer

    from megalm.convert.hf_tokenizer import byte_tokenizer_json

    tok = Tokenizer.from_str(byte_tokenizer_json())
    vocab = json.loads(byte_tokenizer_json())["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(256)) and tok.token_to_id("<|endoftext|>") == 256
    every = bytes(range(256)).decode("latin-1")  # code points 0..255 -> UTF-8 of 1-2 bytes each
    assert tok.encode(every).ids == list(every.encode("utf-8"))
    assert tok.decode(list(every.encode("utf-8"))) == every


@pytest.mark.parametrize("kind", ["byte", "sp_bpe", "sp_unigram", "bytelevel"])
def test_generated_completion_reads_as_transformers_decodes_the_whole_sequence(kind, corpus, tmp_path):
    # tools/generate.py prints prompt + completion; decoding the new ids alone drops sentencepiece's
    # leading word boundary ("Once upon a time" + "the same")
    from megalm.convert.hf_tokenizer import export_tokenizer
    from megalm.data.tokenizer import build_tokenizer
    from megalm.inference.load import TextCodec

    ours = build_tokenizer({"byte": "byte", "bytelevel": "hf"}.get(kind, "sentencepiece"), _trained(kind, corpus, tmp_path))
    export_tokenizer(ours, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = "Once upon a time"
    codecs = [TextCodec(ours, ours.eod, ours.pad), TextCodec(hf, hf.eos_token_id, hf.pad_token_id, hf=True)]
    for continuation in (" the same", "ly, héllo 日本", ", and\nthen"):
        ids, new = ours.encode(prompt), ours.encode(continuation)
        whole = hf.decode(ids + new)
        for codec in codecs:
            assert prompt + codec.completion(ids, new) == whole, (kind, continuation, codec.hf)
    if kind.startswith("sp_"):  # the bug this guards against: the new ids decoded alone
        assert prompt + ours.decode(ours.encode(" the same")) != hf.decode(ours.encode(prompt + " the same"))
