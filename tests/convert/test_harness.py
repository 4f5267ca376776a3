"""lm-evaluation-harness on a megalm checkpoint (tools/evaluate.py --tasks), offline: a
multiple-choice task and a perplexity task written here, run on a TP2 x PP2 checkpoint through
megalm's adapter, equal lm-eval's own Hugging Face backend on the exported model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megalm.testing.runs import REPO, train_env

lm_eval = pytest.importorskip("lm_eval")

MC = [("The capital of France is", [" Paris", " a loop", " Python"], 0),
      ("A for loop iterates over", [" a sequence", " the moon", " blue"], 0),
      ("def f(x): return", [" x", " 42 apples", " ;;;"], 0),
      ("import os; os.path.", ["join", "zebra", "!!!"], 0),
      ("The keyword to define a function is", [" def", " cat", " 7"], 0),
      ("An exception is raised with", [" raise", " paint", " ???"], 0)]
TEXTS = ["The try statement specifies exception handlers and/or cleanup code for a group of statements.",
         "A class definition defines a class object. " * 6,  # longer than one 64-token window
         "Identifiers are unlimited in length. Case is significant."]


def _write_tasks(d: Path) -> Path:
    (d / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in MC))
    (d / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (d / "megalm_mc.yaml").write_text(f"""task: megalm_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (d / "megalm_ppl.yaml").write_text(f"""task: megalm_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'ppl.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    return d


@pytest.mark.slow
def test_tasks_on_a_checkpoint_equal_lm_evals_hf_backend_on_the_export(checkpoints, tmp_path):
    tasks = _write_tasks(tmp_path)
    run = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "--checkpoint",
                          str(checkpoints["llama_tp2_pp2"]), "--tasks", "megalm_mc,megalm_ppl", "--include-path",
                          str(tasks)], env=train_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ours = json.loads(run.stdout.strip().splitlines()[-1])["tasks"]

    from lm_eval.tasks import TaskManager

    from megalm.convert.hf import to_hf

    hf_dir = tmp_path / "hf"
    to_hf(checkpoints["llama_tp2_pp2"], hf_dir, verify=False)
    names = ["megalm_mc", "megalm_ppl"]
    hf_run = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32,max_length=64",
                                     tasks=names, task_manager=TaskManager(include_path=str(tasks)),
                                     bootstrap_iters=0, log_samples=True, device="cpu")
    theirs = hf_run["results"]
    assert ours["megalm_mc"]["acc,none"] == theirs["megalm_mc"]["acc,none"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["megalm_ppl"][metric] == pytest.approx(theirs["megalm_ppl"][metric], rel=1e-4), metric
    assert 1 < ours["megalm_ppl"]["byte_perplexity,none"] < 257  # a trained byte model: better than uniform

    # every request: each choice's log-likelihood, each text's rolling log-likelihood, through
    # megalm's adapter on the checkpoint against lm-eval's HF backend on the export
    from megalm.inference.harness import make_adapter
    from megalm.inference.load import load_model

    model, codec = load_model(str(checkpoints["llama_tp2_pp2"]), None)
    adapter_run = lm_eval.simple_evaluate(model=make_adapter(model, codec), tasks=names, bootstrap_iters=0,
                                          task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    for task, count in (("megalm_mc", 3 * len(MC)), ("megalm_ppl", len(TEXTS))):
        mine, hfs = (_loglikelihoods(run["samples"][task]) for run in (adapter_run, hf_run))
        assert len(mine) == len(hfs) == count, task
        assert mine == pytest.approx(hfs, rel=1e-4, abs=1e-4), task


def _loglikelihoods(samples: list[dict]) -> list[float]:
    """The log-likelihood of every request of a task's logged samples, in document order."""
    out = []
    for sample in sorted(samples, key=lambda x: x["doc_id"]):
        for resp in sample["filtered_resps"]:
            out.append(float(resp[0] if isinstance(resp, (list, tuple)) else resp))
    return out


def _tiny_hf(path: Path) -> Path:
    """A one-layer Hugging Face Llama with the byte tokenizer: enough for lm-eval to start."""
    import torch
    import transformers

    from megalm.convert.hf_tokenizer import export_tokenizer
    from megalm.data.tokenizer import ByteTokenizer

    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=64, bos_token_id=None,
                                   eos_token_id=256, pad_token_id=256)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    export_tokenizer(ByteTokenizer(), path)
    return path


def test_unknown_task_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "--hf", str(_tiny_hf(tmp_path)), "--tasks",
                          "no_such_task"], env=train_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == ("error: lm-eval knows no task 'no_such_task' (local task YAMLs: "
                                                   "--include-path DIR)")


@pytest.mark.slow
def test_task_data_that_cannot_be_loaded_is_one_line_in_the_tool_and_before_training(byte_shards, tmp_path):
    # a task whose data is out of reach (here a missing file; offline, the Hub): one line, exit 2,
    # from the tool and from a training run at start-up, not hours in at the first evaluation
    from megalm.testing.runs import TINY

    tasks = _write_tasks(tmp_path)
    (tasks / "mc.jsonl").unlink()
    tool = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "--hf", str(_tiny_hf(tmp_path / "hf")),
                           "--tasks", "megalm_ppl,megalm_mc", "--include-path", str(tasks)],
                          env=train_env(), capture_output=True, text=True, timeout=300)
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, "-m", "megalm.train", "--config", TINY, f"data.train_prefixes=[{byte_shards}]",
                            f"train.run_dir={run}", "train.eval_tasks=[megalm_ppl,megalm_mc]", "train.eval_tasks_interval=2",
                            f"train.eval_tasks_include_path={tasks}"],
                           env=train_env(), capture_output=True, text=True, timeout=300)
    for r, task in ((tool, "megalm_ppl,megalm_mc"), (train, "megalm_mc")):
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: lm-eval could not load the data of task '{task}': FileNotFoundError"), line
    assert not (run / "metrics.jsonl").exists()  # nothing trained


@pytest.mark.slow
def test_eval_tasks_during_training_equal_the_tool_on_the_saved_checkpoint(convert_shards, tmp_path):
    from megalm.testing.distributed import run_distributed_test
    from megalm.testing.parity import train_rank
    from megalm.testing.runs import TINY, read_metrics

    tasks = _write_tasks(tmp_path)
    run = tmp_path / "run"
    overrides = [f"data.train_prefixes=[{convert_shards}]", f"train.run_dir={run}", "train.steps=4",
                 "train.global_batch_size=8", "train.precision=fp32", "parallel.tensor=2",
                 "train.eval_tasks=[megalm_mc,megalm_ppl]", "train.eval_tasks_interval=2",
                 f"train.eval_tasks_include_path={tasks}", "logging.tensorboard=false"]
    run_distributed_test(train_rank, 2, args=(TINY, overrides), env={"DS_ACCELERATOR": "cpu"})
    logged = {r["step"]: r for r in read_metrics(run) if "lm_eval/megalm_mc/acc" in r}
    assert sorted(logged) == [2, 4]
    tool = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "--checkpoint", str(run),
                           "--tasks", "megalm_mc,megalm_ppl", "--include-path", str(tasks)],
                          env=train_env(), capture_output=True, text=True, timeout=600)
    assert tool.returncode == 0, tool.stderr[-3000:]
    final = json.loads(tool.stdout.strip().splitlines()[-1])["tasks"]
    assert logged[4]["lm_eval/megalm_mc/acc"] == final["megalm_mc"]["acc,none"]
    assert logged[4]["lm_eval/megalm_ppl/byte_perplexity"] == pytest.approx(
        final["megalm_ppl"]["byte_perplexity,none"], rel=1e-5)
