"""curvlab inside the Hugging Face Trainer: ``optimizers=(AdaFisherW(model), scheduler)``.

A tiny GPT-2 built from a config object (no download) trains with gradient accumulation and a
warm-up schedule; a run resumed from its step-3 checkpoint (``resume_from_checkpoint``) ends
bitwise where the uninterrupted run ends. The Trainer saves ``optimizer.state_dict()`` with
``torch.save`` and loads it with ``torch.load(weights_only=True)``: curvlab's state must be
plain tensors and containers for that.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import curvlab

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

STEPS, SAVE_AT = 6, 3


class Counting(torch.utils.data.Dataset):
    """Sequences that count up modulo the vocabulary from a random start: learnable."""

    def __init__(self, n: int = 64, length: int = 16, vocab: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=32,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def run(out: Path, resume: Path | None = None) -> tuple[torch.nn.Module, object]:
    model = tiny_gpt2()
    opt = curvlab.AdaFisherW(model, lr=1e-3, weight_decay=1e-2)
    schedule = transformers.get_scheduler(
        "linear", opt, num_warmup_steps=2, num_training_steps=STEPS
    )
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        save_strategy="steps",
        save_steps=SAVE_AT,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Counting(), optimizers=(opt, schedule)
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model, opt


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    whole, opt = run(tmp_path / "whole")
    assert opt.metrics()["steps"] == STEPS
    assert opt.param_groups[0]["lr"] == 0.0  # the linear schedule reached its end
    resumed, resumed_opt = run(
        tmp_path / "resumed", resume=tmp_path / "whole" / f"checkpoint-{SAVE_AT}"
    )
    assert resumed_opt.metrics()["steps"] == STEPS
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert set(opt.curvature_state) == set(resumed_opt.curvature_state)
    for name, state in opt.curvature_state.items():
        for key, value in state.items():
            assert torch.equal(value, resumed_opt.curvature_state[name][key]), (name, key)


def test_accumulated_statistics_cover_every_micro_batch(tmp_path: Path) -> None:
    """With gradient accumulation each step's factors average over both micro-batches: the
    row count of the first step's statistics is 2 × 4 sequences × 16 tokens (the position
    table sees its (1, 16) positions once per micro-batch: 2 × 16)."""
    model = tiny_gpt2()
    opt = curvlab.AdaFisherW(model, lr=1e-3)
    counts: dict[str, int] = {}
    original = opt._reduce_statistics

    def spy(grads, device):  # noqa: ANN001, ANN202
        stats, ok = original(grads, device)
        counts.update({name: int(c) for name, (_, _, c, _) in stats.items()})
        return stats, ok

    opt._reduce_statistics = spy
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    transformers.Trainer(
        model=model, args=args, train_dataset=Counting(), optimizers=(opt, None)
    ).train()
    assert counts["transformer.wte"] == counts["transformer.ln_f"] == 2 * 4 * 16
    assert counts["transformer.wpe"] == 2 * 16
