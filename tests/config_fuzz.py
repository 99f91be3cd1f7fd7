"""Random configurations of train_gpt.py (run by tests/test_train_gpt.py in its own process):

    python3 tests/config_fuzz.py REPO_ROOT N SEED

For N seeded random combinations of settings (a tiny base, then 1-4 settings drawn from good and
bad values), set the environment, reload train_gpt and either stop with a ConfigError whose
message names a setting, or validate, build, take one training step and quantize, as main()
does. Any other exception is printed with its configuration and exits 1."""
import importlib
import os
import random
import sys
import traceback

sys.path.insert(0, sys.argv[1])
import torch
import train_gpt as tg

CHOICES = {
    "NUM_LAYERS": ["0", "-1", "1", "2", "3"], "MODEL_DIM": ["0", "-8", "16", "24", "32", "33"],
    "NUM_HEADS": ["0", "-1", "1", "2", "3", "4"], "NUM_KV_HEADS": ["0", "-1", "1", "2", "3"],
    "ROPE_DIMS": ["0", "2", "4", "5", "8", "64"], "TRAIN_SEQ_LEN": ["0", "-4", "8", "16"],
    "EVAL_SEQ_LEN": ["0", "8", "16"], "EVAL_STRIDE": ["0", "4", "32"], "VOCAB_SIZE": ["0", "1", "2", "64"],
    "MLP_MULT": ["0", "-1", "0.01", "2", "nan"], "BIGRAM_VOCAB_SIZE": ["0", "1", "2", "31", "-3"],
    "BIGRAM_DIM": ["0", "8", "-1"], "VE_DIM": ["0", "8"], "VE_LAYERS": ["", "-1", "0,5", "x", "-9"],
    "VE_ENABLED": ["0", "1", "yes"], "XSA_LAST_N": ["-1", "0", "2", "99"], "TRAIN_BATCH_TOKENS": ["0", "64", "100", "-64"],
    "GRAD_ACCUM_STEPS": ["0", "-1", "1", "3"], "LOGIT_SOFTCAP": ["0", "-5", "30", "inf"], "EMA_DECAY": ["0", "0.9", "1", "-0.1", "nan"],
    "ATTN_BITS": ["1", "4", "6", "9", "16"], "QUANT_CLIP_RATIOS": ["1.0", "", "0", "2", "a"], "GPTQ_BLOCK_SIZE": ["0", "-1", "16"],
    "MATRIX_LR": ["0.02", "-1", "nan", "inf"], "MUON_BACKEND_STEPS": ["0", "-1", "5"], "MUON_NS_COEFFS": ["1,2", "3.4,-4.7,2.0", "a,b,c", "polar"],
    "WARMDOWN_ITERS": ["-5", "0", "10"], "ITERATIONS": ["-1", "0", "1"], "TTT_LORA_RANK": ["0", "4"], "TTT_LORA_CHUNK": ["0", "4", "99"],
    "NGRAM_ORDER": ["0", "1", "9"], "FINAL_EVAL": ["roundtrip", "", "bogus", "lora+ngram", "ttt", "phased+tilt+ngram"], "SWA_EVERY": ["0", "5"],
    "GRAD_CLIP_NORM": ["-1", "0", "0.3"], "TIE_EMBEDDINGS": ["0", "1"], "COMPRESSOR": ["zstd", "gzip"], "ARTIFACT_CAP": ["0", "-1", "16000000"],
    "ROPE_BASE": ["0", "-10", "10000"], "QK_GAIN_INIT": ["0", "1.5"], "VAL_BATCH_SIZE": ["0", "512"],
    # The April stack's settings.
    "PRESET": ["seeds", "top", "naive_baseline", "best"], "LOOP_LAYERS": ["", "0-1", "1", "1-0", "0-9", "x"],
    "LOOP_REPEATS": ["0", "1", "2"], "LOOP_START_FRAC": ["0", "0.5", "1", "-1"], "PARALLEL_FROM": ["0", "1", "9", "-1"],
    "ATTN_GATE_DIMS": ["0", "4", "999", "-1"], "SEQ_LEN_SCHEDULE": ["", "8:0.5", "8:1.5", "7:0.5", "32:0.5", "a"],
    "MUON_ROW_NORM": ["0", "1"], "NORMUON": ["0", "1"], "NORMUON_BETA2": ["0.95", "1", "-1"], "MIN_LR": ["0", "0.1", "1"],
    "EMA_HALF_LIFE_FRAC": ["0", "0.04", "-1"], "MUON_WD_TAPER_START": ["1", "0.5", "2"], "EMBED_CLIP_SIGMAS": ["0", "20", "-1"],
    "EMBED_GPTQ": ["0", "1"],
}

class RandomLoader:
    def __init__(self, vocab):
        self.vocab = vocab

    def next_batch(self, local_tokens, seq_len):
        ids = torch.randint(0, self.vocab, (local_tokens // seq_len, seq_len + 1))
        return ids[:, :-1], ids[:, 1:]


def one_step_smoke(args):
    """What main() does before and during a training step, on random tokens: validate, build, step, quantize."""
    accum = args.grad_accum_steps or 8
    tg.validate_config(args, 1, accum)
    model = tg.GPT(args)
    qat = tg.prepare_qat(model, args) if args.late_qat_threshold > 0 else []
    tg.select_attention(args.attn_backend, torch.device("cpu"))
    optimizers, muon = tg.build_optimizers(model, args, fused=False)
    model.loop_passes, seq_len = tg.graph_variants(args)[0]  # the shortest length (a schedule's first)...
    model.loop_passes = tg.graph_variants(args)[-1][0]  # ...with the depth loop on, if there is one
    loss = tg.forward_backward(model, RandomLoader(args.vocab_size), args, accum, args.train_batch_tokens // accum,
                               torch.device("cpu"), seq_len)
    tg.optimizer_step(model, optimizers, muon, args, 0, tg.lr_scale(args, 0, 0.0, None))
    tg.refresh_qat(qat, tg.clip_ratios(args))
    assert torch.isfinite(loss), loss
    tg.quantize_state_dict(model.state_dict(), args)


TINY = dict(NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", ROPE_DIMS="8", VOCAB_SIZE="64",
            TRAIN_SEQ_LEN="16", EVAL_SEQ_LEN="16", EVAL_STRIDE="8", TRAIN_BATCH_TOKENS="128", BIGRAM_VOCAB_SIZE="31",
            BIGRAM_DIM="8", VE_DIM="8", GPTQ_BLOCK_SIZE="16")


def main():
    n, seed = int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    base = {k: v for k, v in os.environ.items() if k not in tg.KNOWN_ENV}
    ok = refused = 0
    for i in range(n):
        cfg = {k: rng.choice(CHOICES[k]) for k in rng.sample(sorted(CHOICES), rng.randint(1, 4))}
        os.environ.clear()
        os.environ.update({**base, **TINY, **cfg})
        try:
            importlib.reload(tg)
            one_step_smoke(tg.Hyperparameters())
            ok += 1
        except tg.ConfigError as e:
            named = [k for k in tg.KNOWN_ENV if k in str(e)]
            if not named and not tg.ENV_ERRORS:
                print("UNCLEAR", cfg, e)
                sys.exit(1)
            refused += 1
        except BaseException:
            print("TRACEBACK", cfg)
            traceback.print_exc()
            sys.exit(1)
    print(f"configs:{n} ran:{ok} refused:{refused}")


if __name__ == "__main__":
    main()
