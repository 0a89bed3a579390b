"""Language modelling on the embedded standard-library corpus: corpus rules, the LM loop and a
short run of each lm_stdlib_* config (below the unigram baseline)."""

import json
import math
import warnings

import pytest
import torch

from curvlab.config import parse_config
from curvlab.experiments.data.stdlib_corpus import (
    EXCLUDED_DIRS,
    LMCorpus,
    corpus_info,
    list_files,
    split_files,
    stdlib_corpus,
    unigram_cross_entropy,
)
from curvlab.experiments.runner import task
from curvlab.experiments.train_lm import eval_starts, evaluate_lm, sample_batch, train_lm

#: a small real subset of the standard library (about 0.4 MB, 40-odd files)
SUBSET = ["json/*.py", "email/*.py", "http/*.py"]


def fake_stdlib(root):
    files = {
        "a.py": "import os\n",
        "b.py": "print('b')\n" * 20,
        "pkg/__init__.py": "",
        "pkg/c.py": "x = 1\n" * 50,
        "pkg/d.py": "def f():\n    return 2\n",
        "pkg/notes.txt": "not python",
        "test/test_a.py": "excluded",
        "pkg/tests/t.py": "excluded",
        "idlelib/idle_test/x.py": "excluded",
        "site-packages/foo.py": "excluded",
        "__pycache__/a.py": "excluded",
        "config-3.11-x86_64-linux-gnu/python-config.py": "excluded",
        "_sysconfigdata__linux.py": "excluded",
        "test_top.py": "excluded",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_file_rules_and_split_on_a_fake_library(tmp_path):
    root = fake_stdlib(tmp_path / "lib")
    assert list_files(root) == ["a.py", "b.py", "pkg/__init__.py", "pkg/c.py", "pkg/d.py"]
    assert list_files(root, include=["pkg/*"], max_files=2) == ["pkg/__init__.py", "pkg/c.py"]
    parts = split_files(list_files(root))
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [3, 1, 1]
    with pytest.raises(ValueError, match="at least"):
        split_files(["a.py", "b.py"])
    corpus = stdlib_corpus(root=root, use_cache=False)
    assert corpus.info["n_files"] == 5 and corpus.vocab_size == 256
    # the streams are the files' bytes, each followed by NUL, in sorted order within a split
    for s in ("train", "valid", "test"):
        expected = b"".join((root / f).read_bytes() + b"\0" for f in corpus.info["split_files"][s])
        assert bytes(getattr(corpus, s).numpy()) == expected
    # the fingerprint follows the contents
    (root / "pkg/d.py").write_text("def f():\n    return 3\n")
    changed = stdlib_corpus(root=root, use_cache=False)
    assert changed.info["fingerprint"] != corpus.info["fingerprint"]


def test_stdlib_listing_excludes_tests_and_build_specific_files():
    files = list_files()
    assert len(files) > 300 and files == sorted(files)
    for f in files:
        *dirs, name = f.split("/")
        assert not EXCLUDED_DIRS.intersection(dirs), f
        assert not name.startswith(("test_", "_sysconfigdata")) and name.endswith(".py"), f


def test_subset_corpus_is_deterministic_cached_and_split_by_file(tmp_path):
    a = stdlib_corpus(include=SUBSET, use_cache=False)
    b = stdlib_corpus(include=SUBSET, cache_dir=tmp_path)
    c = stdlib_corpus(include=SUBSET, cache_dir=tmp_path)
    assert not b.info["cached"] and c.info["cached"]
    assert a.info["fingerprint"] == b.info["fingerprint"] == c.info["fingerprint"]
    for s in ("train", "valid", "test"):
        assert torch.equal(getattr(a, s), getattr(c, s))
    parts = {s: set(a.info["split_files"][s]) for s in ("train", "valid", "test")}
    assert all(parts.values())
    assert not (parts["train"] & parts["valid"] or parts["train"] & parts["test"]
                or parts["valid"] & parts["test"])
    assert set().union(*parts.values()) == set(list_files(include=SUBSET))
    assert sum(a.info["tokens"].values()) == a.info["total_bytes"] + a.info["n_files"]
    assert corpus_info(a)["fingerprint"] == a.info["fingerprint"]
    assert "split_files" not in corpus_info(a)


def test_windows_and_evaluation_helpers():
    stream = torch.arange(100, dtype=torch.uint8)
    x, y = sample_batch(stream, 4, 10, torch.Generator().manual_seed(0))
    assert x.dtype == torch.int64 and x.shape == y.shape == (4, 10)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert eval_starts(100, 10, None).tolist() == list(range(0, 90, 10))
    assert len(eval_starts(1000, 10, 50)) == 5
    model = torch.nn.Sequential(torch.nn.Embedding(256, 256))  # logits 0 -> loss ln 256
    torch.nn.init.zeros_(model[0].weight)
    loss, n = evaluate_lm(model, stream, 10)
    assert n == 90 and loss == pytest.approx(math.log(256))


def tiny_corpus():
    return stdlib_corpus(include=SUBSET, use_cache=False)


def tiny_gpt(vocab_size=256):
    from curvlab.experiments.models import gpt

    return gpt(vocab_size=vocab_size, context=32, d_model=32, n_layers=1, n_heads=2)


def test_train_lm_writes_metrics_and_stops_on_its_budgets(tmp_path):
    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=3e-3)

    summary = train_lm(model=tiny_gpt, data=tiny_corpus, optimizer=adamw, steps=12, batch_size=4,
                       eval_every=5, eval_tokens=512, final_eval_tokens=1024, warmup_steps=3,
                       out_dir=tmp_path, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 5, 10, 12]
    assert rows[0]["val_loss"] == pytest.approx(math.log(256), abs=0.1)
    assert rows[1]["lr"] == pytest.approx(3e-3)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["corpus_fingerprint"] == tiny_corpus().info["fingerprint"]
    assert saved["run"]["corpus"]["tokens"]["valid"] > 0
    assert saved["eval_tokens"] == {"val": 1024, "test": 1024}
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2))
    assert summary["test_ppl"] == pytest.approx(math.exp(summary["test_loss"]))
    assert (tmp_path / "operative_config.gin").is_file()

    short = train_lm(model=tiny_gpt, data=tiny_corpus, optimizer=adamw, steps=1000,
                     time_budget_s=0.0, eval_tokens=256, final_eval_tokens=256,
                     evaluate_test=False, quiet=True)
    assert short["steps"] == 1 and short["test_loss"] is None


def test_plain_text_split_is_accepted():
    from curvlab.experiments.data import TextSplit

    def data():
        g = torch.Generator().manual_seed(0)
        return TextSplit(*(torch.randint(0, 7, (2000,), generator=g) for _ in range(3)), 7)

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    summary = train_lm(model=tiny_gpt, data=data, optimizer=sgd, steps=2, batch_size=2,
                       eval_tokens=128, final_eval_tokens=128, quiet=True)
    assert len(summary["corpus_fingerprint"]) == 64 and summary["val_bpb"] is None


CONFIGS = ["lm_stdlib_adafisherw", "lm_stdlib_adafisherw_official", "lm_stdlib_adamw"]
TINY = [
    "models.gpt.context = 32",
    "models.gpt.d_model = 32",
    "models.gpt.n_layers = 1",
    "models.gpt.n_heads = 2",
    f"data.stdlib_corpus.include = {SUBSET!r}",
    "data.stdlib_corpus.use_cache = False",
    "lm.train_lm.time_budget_s = None",
    "lm.train_lm.steps = 300",
    "lm.train_lm.batch_size = 16",
    "lm.train_lm.warmup_steps = 10",
    "lm.train_lm.eval_every = 1000",
    "lm.train_lm.eval_tokens = 2048",
    "lm.train_lm.final_eval_tokens = 8192",
]


@pytest.mark.parametrize("config", CONFIGS)
def test_each_config_beats_the_unigram_baseline(config, tmp_path):
    corpus = tiny_corpus()
    baseline = unigram_cross_entropy(corpus.train, corpus.valid)
    assert 2.5 < baseline < 4.0  # nats per byte of Python source
    parse_config(f"configs/{config}.gin", TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the official variant warns about pos_emb (F = 1)
        summary = task()(out_dir=str(tmp_path), quiet=True)
    assert summary["steps"] == 300
    assert summary["val_loss"] < baseline, (config, summary["val_loss"], baseline)
    assert summary["test_loss"] is not None and math.isfinite(summary["test_bpb"])
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["corpus_fingerprint"] == corpus.info["fingerprint"]
    assert saved["run"]["threads"] == 1


def test_gpt_parameters_are_covered_by_adapters():
    import curvlab
    from curvlab.experiments.models import gpt

    model = gpt(context=16, d_model=16, n_layers=2, n_heads=2)
    assert curvlab.AdaFisherW(model).fallback_parameters() == []  # tied head: via tok_emb + head
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        official = curvlab.AdaFisherW(model, variant="official")
    assert [f.name for f in official.fallback_parameters()] == ["pos_emb.weight"]
    assert isinstance(tiny_corpus(), LMCorpus)


def test_wikitext2_corpus_has_the_same_interface(tmp_path):
    from curvlab.experiments.data.stdlib_corpus import wikitext2_corpus

    for split, text in (("train", " = A = \n the cat sat \n"), ("valid", " the dog \n"),
                        ("test", " a cat \n")):
        (tmp_path / f"wiki.{split}.tokens").write_text(text)
    with pytest.raises(FileNotFoundError, match="WikiText-2 not found"):
        wikitext2_corpus(root=tmp_path / "missing")
    b = wikitext2_corpus(root=tmp_path)
    assert isinstance(b, LMCorpus) and b.vocab_size == 256 and b.train.dtype == torch.uint8
    assert bytes(b.valid.numpy()) == b" the dog \n" and b.info["bytes_per_token"]["test"] == 1.0
    w = wikitext2_corpus(root=tmp_path, tokenizer="words")
    assert w.vocab_size == len(w.vocab) and w.info["bytes_per_token"]["valid"] == 10 / 3
    assert w.info["fingerprint"] != b.info["fingerprint"]


def test_train_lm_reports_a_curvlab_optimizers_coverage(tmp_path, capsys):
    """The LM runner prints the coverage line before training and writes it to summary.json,
    as `curvlab run` does; torch.optim baselines have none (the AdamW run above)."""
    import curvlab

    train_lm(model=tiny_gpt, data=tiny_corpus, optimizer=lambda m: curvlab.AdaFisherW(m, lr=1e-3),
             steps=2, batch_size=2, eval_every=2, eval_tokens=128, final_eval_tokens=128,
             evaluate_test=False, out_dir=tmp_path)
    first = capsys.readouterr().out.strip().splitlines()[0]
    assert first.startswith("curvature coverage 100.00% (")
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["coverage"]["share"] == 1.0
    assert saved["coverage"]["total_elements"] > 0
