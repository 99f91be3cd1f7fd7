"""The April records' evaluation (issue 16): phased TTT, the token n-gram tilt, the asymmetric softcap, short-document
chunks, the one-pass check and the evaluation plan. CPU, tiny models."""
import itertools
import math

import numpy as np
import pytest
import torch

from test_train_gpt import audit, eval_args, final_value, quiet, randomized_model, run_script, sample, tg, tiny_run_env  # noqa: F401

CPU = torch.device("cpu")


def brute_force_hints(u, orders, min_count, threshold):
    """The tilt's definition, token by token: counts of what followed each context before target t."""
    out = [-1] * (len(u) - 1)
    for t, k in itertools.product(range(len(u) - 1), sorted(orders, reverse=True)):
        if out[t] >= 0 or t < k - 1:
            continue
        ctx, counts = u[t - k + 1:t + 1], {}
        for j in range(k - 1, t):
            if u[j - k + 1:j + 1] == ctx:
                counts[u[j + 1]] = counts.get(u[j + 1], 0) + 1
        seen = sum(counts.values())
        if seen >= min_count:
            best = max(counts.values())
            if best >= threshold * seen:
                out[t] = max(tok for tok, c in counts.items() if c == best)  # ties: the larger id
    return out


@pytest.mark.parametrize("seed", range(12))
def test_tilt_hints_are_the_prefix_counts(seed):
    g = torch.Generator().manual_seed(seed)
    V, n = int(torch.randint(3, 7, (1,), generator=g)), int(torch.randint(5, 150, (1,), generator=g))
    u = torch.randint(0, V, (n,), generator=g)
    args = eval_args(vocab_size=V, tilt_orders="3,1,2", tilt_min_count=2, tilt_threshold=0.6)
    hints = tg.tilt_hints(u, args, CPU)
    assert hints.tolist() == brute_force_hints(u.tolist(), [1, 2, 3], 2, 0.6)
    t = n // 2  # prefix-only: a new future leaves every hint up to t as it was
    future = torch.cat((u[:t + 1], torch.randint(0, V, (n - t - 1,), generator=g)))
    assert torch.equal(tg.tilt_hints(future, args, CPU)[:t + 1], hints[:t + 1])


def test_tilt_is_a_normalized_distribution_that_helps_on_repetitive_text():
    args = eval_args(tilt_orders="4", tilt_boost=2.0, eval_seq_len=320)  # one window: the whole stream
    model = randomized_model(args)
    phrase = torch.randint(2, args.vocab_size, (40,), generator=torch.Generator().manual_seed(2))
    tokens = torch.cat([torch.tensor([tg.BOS_ID]), phrase.repeat(8)])
    ev = tg.Evaluation(args, model, model, CPU, log=quiet)
    plain = tg.run_eval_mode(ev, "roundtrip", tokens, audit=True)
    tilted = tg.run_eval_mode(ev, "roundtrip+tilt", tokens, audit=True)
    tilted.check_once()
    assert tilted.norm_err.item() < 1e-5 and tilted.nats.mean() < 0.8 * plain.nats.mean()
    # The closed form: -log p(y) - boost [y = hint] + log(1 + p(hint) (e^boost - 1)).
    hint = tg.tilt_hints(tokens, args, CPU)
    y = tokens[1:]
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens[None, :-1])[0].float(), -1)
    p_hint = logp.gather(1, hint.clamp(min=0)[:, None])[:, 0].exp()
    expect = -logp.gather(1, y[:, None])[:, 0] - 2.0 * (y == hint) + torch.log1p(p_hint * math.expm1(2.0))
    expect = torch.where(hint >= 0, expect, plain.nats)
    assert (hint >= 0).sum() > 100 and torch.allclose(tilted.nats, expect, atol=1e-4)


@pytest.mark.parametrize("mode,over", [
    ("phased", {}), ("phased+tilt", dict(tilt_orders="2")), ("lora+tilt+ngram", dict(tilt_orders="3,2")),
    ("phased", dict(ttt_lora_targets="k,o,mlp,head", ttt_warm_start_a=True, ttt_local_lr_mult=0.75,
                    ttt_short_chunks="12:2,30:4", phased_ttt_num_phases=2, ttt_asym_softcap=True)),
    ("sliding_window+tilt", dict(tilt_orders="4,2"))])
def test_new_modes_pass_the_audit(mode, over):
    lines = []
    audit(mode, eval_args(**over), log=lambda m, console=True: lines.append(m))
    line = next(x for x in lines if x.startswith("eval_audit:"))
    assert f"eval_audit:{mode} ok" in line and "scored_once:ok one_pass:ok" in line


def phased_setup(**over):
    args = eval_args(phased_ttt_prefix_docs=4, **over)
    model = randomized_model(args)
    tokens = torch.randint(2, args.vocab_size, (400,), generator=torch.Generator().manual_seed(5))
    tokens[::50] = tg.BOS_ID
    return args, model, tokens, tg.Evaluation(args, model, model, CPU, log=quiet)


def test_phased_adapts_after_each_phase_and_leaves_the_weights():
    args, model, tokens, ev = phased_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora, phased = (tg.run_eval_mode(ev, m, tokens).nats for m in ("lora", "phased"))
    # Phases end after documents 1, 2 and 4 of 8 (50 targets each): the first is scored as by `lora`.
    assert torch.equal(lora[:50], phased[:50]) and not torch.equal(lora[50:100], phased[50:100])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.asym_softcap is None
    args.ttt_lr = 0.0  # no global step: every document as `lora` scores it
    assert torch.allclose(tg.run_eval_mode(ev, "phased", tokens).nats, lora, atol=1e-6)


def test_asymmetric_softcap_starts_symmetric_and_is_adapted():
    args, model, tokens, ev = phased_setup(ttt_lr=0.0)
    plain = tg.run_eval_mode(ev, "phased", tokens).nats
    args.ttt_asym_softcap = True
    assert torch.allclose(tg.run_eval_mode(ev, "phased", tokens).nats, plain, atol=1e-6)  # lr 0: caps stay at 30
    lines = []
    args.ttt_lr, ev.log = 0.5, lambda m, console=True: lines.append(m)
    tg.run_eval_mode(ev, "phased", tokens)
    pos, neg = map(float, next(x for x in lines if "asym_softcap" in x).replace(":", " ").split()[3::2])
    assert (pos, neg) != (args.logit_softcap, args.logit_softcap) and model.asym_softcap is None


def test_short_documents_are_scored_in_smaller_chunks(monkeypatch):
    args, model, tokens, ev = phased_setup(ttt_short_chunks="60:5", ttt_lora_chunk=20)
    steps = []
    real = tg.ScoreSheet.record
    monkeypatch.setattr(tg.ScoreSheet, "record", lambda self, pos, *a: (steps.append(len(pos)), real(self, pos, *a)))
    tg.run_eval_mode(ev, "lora", tokens).check_once()
    assert len(steps) == 30 and sum(steps) == 399  # 3 batches of 50-target documents: 10 chunks of 5, not 3 of 20


def test_phased_that_trains_on_the_next_phase_is_caught(monkeypatch):
    real = tg.sgd_on_prefix
    monkeypatch.setattr(tg, "sgd_on_prefix", lambda ev, tokens, end, *a: real(ev, tokens, tokens.numel() - 1, *a))
    with pytest.raises(tg.EvalError, match="after an update that trained on them"):
        audit("phased", eval_args())


def test_score_adapt_rescore_is_caught(monkeypatch):
    """A second pass: phased TTT as it is, then every target scored again with the adapted weights, the first
    scores thrown away. Every target is recorded once in the end."""
    real = tg.sgd_on_prefix

    def rescore(ev, tokens, end, sheet, *a):
        real(ev, tokens, end, sheet, *a)
        sheet.hits[:end] = 0  # forget the first scores...
        sheet.nats[:end] = 0
        with torch.no_grad():  # ...and score them again with the weights that trained on them
            tg.score_windows(ev, tokens, *tg.window_plan(end, ev.args.eval_seq_len, ev.args.eval_seq_len),
                             ev.args.eval_seq_len, sheet)

    monkeypatch.setattr(tg, "sgd_on_prefix", rescore)
    with pytest.raises(tg.EvalError, match="not one pass"):
        audit("phased", eval_args())


def test_a_tilt_that_reads_the_target_is_caught(monkeypatch):
    monkeypatch.setattr(tg, "tilt_hints", lambda tokens, args, device: tokens[1:].clone())
    with pytest.raises(tg.EvalError, match="moved"):
        audit("roundtrip+tilt", eval_args())


def test_evaluation_plan_is_logged_before_scoring():
    args, lines = eval_args(final_eval="roundtrip,phased+tilt"), []
    model = randomized_model(args)
    tokens = torch.randint(2, args.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    ev = tg.Evaluation(args, model, model, CPU, log=lambda m, console=True: lines.append(m), val_targets=62_021_632)
    luts = (torch.ones(args.vocab_size, dtype=torch.int16), torch.zeros(args.vocab_size, dtype=torch.bool),
            torch.zeros(args.vocab_size, dtype=torch.bool))
    tg.final_evaluation(ev, "int6_zstd", lambda mode, toks=None, audit=False: (
        tg.run_eval_mode(ev, mode, tokens if toks is None else toks, audit) if toks is not None
        else tg.run_eval_mode(ev, mode, tokens).result(tokens, luts)), None)
    plan = next(i for i, x in enumerate(lines) if x.startswith("eval_plan:"))
    assert plan < next(i for i, x in enumerate(lines) if x.startswith("final_"))
    secs = dict(kv.split(":") for kv in lines[plan].split()[1:3])
    assert set(secs) == {"roundtrip", "phased+tilt"} and float(secs["phased+tilt"][:-1]) > float(secs["roundtrip"][:-1])
    assert "WARNING: over 600s" in lines[plan]  # a CPU at audit speed: 62M targets would take hours


@pytest.mark.parametrize("setting,value", [("final_eval", "lora+tilt+tilt"), ("final_eval", "phased+cache"),
                                           ("tilt_orders", "16,x"), ("tilt_orders", "0"),
                                           ("ttt_lora_targets", "q,gate"), ("ttt_short_chunks", "256:9999"),
                                           ("ttt_short_chunks", "256")])
def test_bad_evaluation_settings_are_refused(setting, value):
    with pytest.raises(tg.ConfigError, match=setting.upper()):
        tg.validate_config(eval_args(**{setting: value}), 1, 8)


def test_two_processes_match_one_for_phased_and_tilt(sample, tmp_path):
    env = tiny_run_env(sample, ITERATIONS=2, EMA_ENABLED=0, SEED=7, FINAL_EVAL="phased,lora+tilt", TTT_CHUNK_TOKENS=512,
                       TTT_LORA_CHUNK=16, PHASED_TTT_PREFIX_DOCS=4, TTT_WARM_START_A=1, TILT_ORDERS="3,2")
    runs = {}
    for n in (1, 2):  # TTT_BATCH_SEQS is a rank's: the same global batch of the global SGD either way
        (tmp_path / str(n)).mkdir()
        runs[n] = run_script(tmp_path / str(n), env | dict(TTT_BATCH_SEQS=8 // n), nproc=2 if n == 2 else None)
        assert runs[n].returncode == 0, runs[n].stderr[-3000:]
    for key in ("phased", "lora_tilt"):
        a, b = (final_value(runs[n].stdout, f"final_int6_zstd_{key}_exact") for n in (1, 2))
        assert abs(a[0] - b[0]) < 2e-4, (key, a, b)
