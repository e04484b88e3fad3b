"""Zero-shot multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness does.

Each choice is a continuation " " + choice after the query (WinoGrande: the same continuation after
each of two contexts); `acc` takes the argmax of the summed log-likelihood of the continuation
tokens, `acc_norm` the argmax of that sum divided by the choice's length in bytes. LAMBADA counts an
item right when greedy decoding reproduces every token of its continuation. Tokenisation follows the
harness: trailing whitespace of the context moves into the continuation, the pair is encoded whole,
and the continuation tokens are those after the context's own encoding.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import HarpqError
from ..paths import DEFAULT_TASKS_DIR, TASKS

Pair = tuple[list[int], list[int]]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> Pair:
    """(context ids, continuation ids) with the harness's whitespace rule."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    if whole[: len(ctx)] != ctx or len(whole) == len(ctx):  # a token merged across the boundary
        return ctx, tokenizer(continuation, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(
    model: nn.Module, pairs: list[Pair], batch_size: int = 16, max_length: int | None = None, progress: bool = False,
    desc: str = "loglik",
) -> list[tuple[float, bool]]:
    """(Σ log p(continuation | context), greedy decoding reproduces it) for every pair, batched.

    Longest first, right-padded (a causal model's real positions never see the padding); a sequence
    longer than `max_length` + 1 keeps its last tokens, as the harness does.
    """
    device = next(model.parameters()).device
    max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
    inputs = []
    for ctx, cont in pairs:
        if not cont:
            raise HarpqError("a continuation encodes to no tokens")
        inputs.append((ctx + cont)[-(max_length + 1):][:-1])
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        width = len(inputs[idx[0]])
        batch = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):
            batch[row, : len(inputs[i])] = torch.tensor(inputs[i])
        logprobs = F.log_softmax(model(batch.to(device), use_cache=False).logits.float(), dim=-1).cpu()
        for row, i in enumerate(idx):
            cont = pairs[i][1]
            end = len(inputs[i])
            lp = logprobs[row, end - len(cont): end]
            target = torch.tensor(cont)
            out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    return out


#: the fields every item of a task must have (the others: query, choices, gold)
REQUIRED_FIELDS = {"lambada_openai": ("context", "continuation"),
                   "winogrande": ("context_options", "continuation", "gold")}


def load_task(name: str, tasks_dir: str | Path = DEFAULT_TASKS_DIR, limit: int | None = None) -> list[dict]:
    if name not in TASKS:
        raise HarpqError(f"unknown task {name!r} (offered: {', '.join(TASKS)})")
    path = Path(tasks_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise HarpqError(f"task file {path} not found (pass --tasks-dir DIR or set HARPQ_TASKS_DIR)")
    need = REQUIRED_FIELDS.get(name, ("query", "choices", "gold"))
    docs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise HarpqError(f"task file {path} is not UTF-8 text") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise HarpqError(f"{path}:{i}: not JSON ({e.msg})") from None
        missing = [k for k in need if not isinstance(doc, dict) or k not in doc]
        if missing:
            raise HarpqError(f"{path}:{i}: an item of {name} needs the field(s) {', '.join(missing)}")
        docs.append(doc)
        if limit is not None and len(docs) >= limit:
            break
    if not docs:
        raise HarpqError(f"task file {path} holds no items")
    return docs


def task_pairs(name: str, doc: dict, tokenizer: Any) -> tuple[list[Pair], list[int]]:
    """The (context, continuation) pairs of one item and each option's length in bytes."""
    if name == "lambada_openai":
        return [encode_pair(tokenizer, doc["context"], doc["continuation"])], [len(doc["continuation"].encode())]
    if name == "winogrande":
        cont = " " + doc["continuation"]
        return [encode_pair(tokenizer, c, cont) for c in doc["context_options"]], [len(cont.encode())] * 2
    return ([encode_pair(tokenizer, doc["query"], " " + c) for c in doc["choices"]],
            [len(c.encode()) for c in doc["choices"]])


def score_task(name: str, docs: list[dict], scores: list[list[tuple[float, bool]]], lengths: list[list[int]]) -> dict:
    """acc / acc_norm (LAMBADA: acc and perplexity of the continuation) from per-option scores."""
    n = len(docs)
    if name == "lambada_openai":
        lls = [s[0][0] for s in scores]
        return {"acc": sum(s[0][1] for s in scores) / n, "ppl": math.exp(-sum(lls) / n), "n": n}
    acc = norm = 0
    for doc, s, lens in zip(docs, scores, lengths, strict=True):
        lls = [ll for ll, _ in s]
        acc += max(range(len(lls)), key=lls.__getitem__) == doc["gold"]
        norm += max(range(len(lls)), key=lambda j: lls[j] / lens[j]) == doc["gold"]
    return {"acc": acc / n, "acc_norm": norm / n, "n": n}


def evaluate_tasks(
    model: nn.Module, tokenizer: Any, tasks: list[str], tasks_dir: str | Path = DEFAULT_TASKS_DIR,
    limit: int | None = None, batch_size: int = 16, progress: bool = True,
) -> dict[str, dict]:
    """{task: {"acc", "acc_norm" (or "ppl"), "n"}} for each task."""
    loaded = {t: load_task(t, tasks_dir, limit) for t in tasks}  # a bad name or path fails before any work
    results = {}
    for name, docs in loaded.items():
        per_doc = [task_pairs(name, d, tokenizer) for d in docs]
        flat = [p for pairs, _ in per_doc for p in pairs]
        lls = loglikelihoods(model, flat, batch_size, progress=progress, desc=name)
        scores, at = [], 0
        for pairs, _ in per_doc:
            scores.append(lls[at: at + len(pairs)])
            at += len(pairs)
        results[name] = score_task(name, docs, scores, [lens for _, lens in per_doc])
    return results
