"""Downstream evals: lm-evaluation-harness (the `lm-eval` package) on a megalm model.

`MegalmLM` adapts a megalm GPT and its tokenizer (`load_model`: a checkpoint of any layout, or a
Hugging Face directory) to lm-eval's TemplateLM: lm-eval tokenizes contexts and continuations with
the model's tokenizer (no BOS, as its HF backend by default), and the model scores them:

    loglikelihood          sum of log p(continuation | context), and whether it is the greedy one
    loglikelihood_rolling  the whole text in windows of max_seq_len (perplexity tasks)
    generate_until         greedy generation, cut at the task's stop strings

    python tools/evaluate.py --checkpoint RUN_DIR --tasks hellaswag,lambada_openai [--limit 100]
    python tools/evaluate.py --checkpoint RUN_DIR --tasks my_task --include-path DIR_OF_TASK_YAMLS

Results are lm-eval's own dictionaries; `run_tasks` returns {task: {metric: value}}. During
training (train.eval_tasks every train.eval_tasks_interval steps) every rank runs the same requests
in the same order, so the tensor-parallel collectives of its forward passes (and ZeRO-3's gathers)
pair up; rank 0 logs the results as lm_eval/TASK/METRIC.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megalm.errors import MegalmError
from megalm.inference.generate import Sampling, generate
from megalm.inference.load import TextCodec


def _lm_eval() -> Any:
    try:
        import lm_eval  # noqa: PLC0415 - optional: only for --tasks
        import lm_eval.api.model  # noqa: PLC0415
        import lm_eval.utils  # noqa: PLC0415
    except ImportError:
        raise MegalmError("--tasks needs lm-evaluation-harness: pip install 'megalm[eval]'") from None
    return lm_eval


def make_adapter(model: torch.nn.Module, codec: TextCodec, batch_size: int = 8) -> Any:
    """An lm-eval LM scoring with `model` (a megalm GPT in eval mode) and `codec`'s tokenizer."""
    lm_eval = _lm_eval()
    rolling_windows, disjoint = lm_eval.utils.get_rolling_token_windows, lm_eval.utils.make_disjoint_window

    class MegalmLM(lm_eval.api.model.TemplateLM):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.codec, self.batch_size = model, codec, batch_size
            self.max_length = model.cfg.max_seq_len

        @property
        def eot_token_id(self) -> int:
            return self.codec.eod

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            return self.codec.encode(string)

        @torch.no_grad()
        def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
            """log p(continuation | context) and whether every continuation token is the argmax,
            over the last max_length tokens of context + continuation."""
            whole = (context + continuation)[-(self.max_length + 1):]
            tokens = torch.tensor([whole[:-1]])
            logprobs = F.log_softmax(self.model.logits_full(tokens)[0].float(), dim=-1)
            n = len(continuation)
            targets = torch.tensor(whole[-n:])
            picked = logprobs[-n:].gather(-1, targets[:, None])[:, 0]
            return float(picked.sum()), bool((logprobs[-n:].argmax(-1) == targets).all())

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
            out = []
            for _, context, continuation in requests:
                result = self._score(context, continuation)
                out.append(result)
            return out

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            totals = []
            for (text,) in [r.args for r in requests]:
                windows = map(disjoint, rolling_windows(token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                                                        max_seq_len=self.max_length, context_len=1))
                totals.append(sum(self._score(ctx, cont)[0] for ctx, cont in windows))
            return totals

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            out = []
            for context, gen_kwargs in [r.args for r in requests]:
                stops = gen_kwargs.get("until") or []
                stops = [stops] if isinstance(stops, str) else stops
                prompt = self.codec.encode(context)[-(self.max_length - 1):]
                room = min(int(gen_kwargs.get("max_gen_toks", 256)), self.max_length - len(prompt))
                new = generate(self.model, [prompt], room, Sampling(greedy=True), eod=self.codec.eod,
                               pad=self.codec.pad).tokens[0]
                text = self.codec.completion(prompt, [t for t in new if t != self.codec.eod])
                for stop in stops:
                    text = text.split(stop)[0]
                out.append(text)
            return out

    return MegalmLM()


def _task_manager(tasks: list[str], include_path: str | None) -> Any:
    """lm-eval's TaskManager, after checking that it knows every task name."""
    from lm_eval.tasks import TaskManager  # noqa: PLC0415 - optional

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise MegalmError(f"lm-eval knows no task {unknown[0]!r}" + ("" if include_path else
                          " (local task YAMLs: --include-path DIR)"))
    return manager


def _data_error(task: str, error: OSError) -> MegalmError:
    return MegalmError(
        f"lm-eval could not load the data of task {task!r}: {type(error).__name__}: {str(error).strip()[:300]} "
        "(download it once with network access, HF_DATASETS_OFFLINE unset, or point a local task YAML at "
        "files you have)")


def check_tasks(tasks: list[str], *, include_path: str | None = None) -> None:
    """Load each task and its data once (into the datasets cache): a name lm-eval does not know, or
    data it cannot reach (offline, a missing file), is one line now instead of at the first
    evaluation, hours into a run."""
    _lm_eval()
    manager = _task_manager(tasks, include_path)
    for task in tasks:
        try:
            manager.load([task])
        except OSError as e:  # ConnectionError, FileNotFoundError, datasets' DatasetNotFoundError
            raise _data_error(task, e) from None


def run_tasks(model: torch.nn.Module, codec: TextCodec, tasks: list[str], *, include_path: str | None = None,
              limit: int | None = None, batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on the model; {task: {metric: value}} (lm-eval's "metric,filter" keys),
    {} on the ranks lm-eval does not aggregate on (LOCAL_RANK > 0)."""
    lm_eval = _lm_eval()
    manager = _task_manager(tasks, include_path)
    try:
        results = lm_eval.simple_evaluate(model=make_adapter(model, codec, batch_size), tasks=tasks,
                                          task_manager=manager, limit=limit, bootstrap_iters=0, log_samples=False)
    except OSError as e:  # lm-eval loads every task's data before it runs the model
        raise _data_error(",".join(tasks), e) from None
    if results is None:  # lm-eval aggregates on LOCAL_RANK 0 only; the other ranks ran the same forwards
        return {}
    return {task: {k: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
            for task, metrics in results["results"].items()}


def task_scalars(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: {"acc,none": v}} -> {"lm_eval/task/acc": v}: the metrics' names in metrics.jsonl,
    TensorBoard and W&B."""
    return {f"lm_eval/{task}/{key.split(',')[0]}": value for task, metrics in results.items()
            for key, value in metrics.items()}
