import json

import pytest
import torch
from click.testing import CliRunner
from conftest import TASKS_DIR

import harpq
from harpq import HarpqError
from harpq.cli.main import cli
from harpq.eval.zeroshot import encode_pair, loglikelihoods, score_task, task_pairs
from harpq.io.model import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_model(tiny_path, dtype=torch.float32), load_tokenizer(tiny_path)


def hand_loglik(model, ctx, cont):
    """Σ log p(cont | ctx) from one unbatched forward pass, one token at a time."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_batched_loglikelihoods_equal_hand_computed_ones(tiny):
    model, tok = tiny
    items = [("Question: What is the sky?", " Blue, mostly."), ("A", " b"),
             ("The quick brown fox jumps over", " the lazy dog"),
             ("Passage: tea is hot.\nQuestion: is tea hot?", " yes")]
    pairs = [encode_pair(tok, c, x) for c, x in items]
    got = loglikelihoods(model, pairs, batch_size=3)  # mixed lengths: padding inside a batch
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        assert ll == pytest.approx(hand_loglik(model, ctx, cont), abs=1e-4)
        with torch.no_grad():
            pred = model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1: -1].argmax(-1)
        assert greedy == bool((pred == torch.tensor(cont)).all())


def test_trailing_space_moves_into_the_continuation(tiny):
    _, tok = tiny
    ctx, cont = encode_pair(tok, "Question: why \n", " because")
    assert tok.decode(ctx) == "Question: why"
    assert tok.decode(ctx + cont) == "Question: why \n because"


def test_acc_and_acc_norm_pick_the_right_option():
    docs = [{"gold": 0, "choices": ["a", "bbbb"]}, {"gold": 1, "choices": ["a", "bbbb"]}]
    scores = [[(-1.0, False), (-2.0, False)], [(-1.0, False), (-2.0, False)]]  # raw: option 0 wins
    r = score_task("arc_easy", docs, scores, [[1, 4], [1, 4]])  # per byte: −1 vs −0.5, option 1 wins
    assert r == {"acc": 0.5, "acc_norm": 0.5, "n": 2}
    lam = score_task("lambada_openai", [{}, {}], [[(-1.0, True)], [(-3.0, False)]], [[5], [5]])
    assert lam["acc"] == 0.5 and lam["ppl"] == pytest.approx(torch.e ** 2)


def test_winogrande_scores_one_continuation_after_each_context(tiny):
    _, tok = tiny
    doc = {"context_options": ["Sam gave Kim a gift so Sam", "Sam gave Kim a gift so Kim"],
           "continuation": "was generous.", "gold": 0}
    pairs, lens = task_pairs("winogrande", doc, tok)
    assert len(pairs) == 2 and pairs[0][1] == pairs[1][1] and lens[0] == lens[1]


def test_eval_tasks_cli_json(tiny_path, tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["eval", str(tiny_path), "--tasks", "arc_easy,lambada_openai", "--limit", "6",
                                   "--tasks-dir", str(TASKS_DIR), "--json", str(out)])
    assert res.exit_code == 0, res.output
    tasks = json.loads(out.read_text())["tasks"]
    assert tasks["arc_easy"]["n"] == 6 and 0 <= tasks["arc_easy"]["acc_norm"] <= 1
    assert set(tasks["lambada_openai"]) == {"acc", "ppl", "n"}


def test_bad_task_input_fails_in_one_line(tiny_path, tmp_path):
    with pytest.raises(HarpqError, match="unknown task 'hellaswag'"):
        harpq.evaluate(tiny_path, tasks=["hellaswag"])
    with pytest.raises(HarpqError, match="task file .*arc_easy.jsonl not found"):
        harpq.evaluate(tiny_path, tasks=["arc_easy"], tasks_dir=tmp_path)
    res = CliRunner().invoke(cli, ["eval", str(tiny_path)])
    assert res.exit_code == 2 and "nothing to evaluate" in res.output


def test_a_merge_across_the_boundary_still_scores_the_continuation(tiny):
    _, tok = tiny
    for ctx_text, cont_text in (("the cat", "s"), ("abc", "def"), ("hello", "world")):
        ctx, cont = encode_pair(tok, ctx_text, cont_text)
        assert cont and tok.decode(ctx) == ctx_text
