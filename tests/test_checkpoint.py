import random

import deepspeed
import pytest
import torch

from cliplite_dist import checkpoint


@pytest.fixture
def engine(single_rank_group):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 1}, "steps_per_print": 10**9})
    return eng


def train_step(eng):
    loss = eng(torch.randn(2, 4)).pow(2).mean()
    eng.backward(loss)
    eng.step()


def test_save_prune_and_resume_restores_weights_optimizer_and_rng(engine, tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        train_step(engine)
        checkpoint.save(engine, root, step, {"step": step, "epoch": 0}, keep=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000002", "step_00000003"]
    assert (root / "latest").read_text().strip() == "step_00000003"
    saved = {k: v.clone() for k, v in engine.module.state_dict().items()}
    expected_rand = (torch.rand(3), random.random())
    train_step(engine)  # move away from the checkpoint, then come back
    state = checkpoint.load(engine, root, checkpoint.find_latest(root))
    assert state == {"step": 3, "epoch": 0}
    for k, v in engine.module.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert torch.equal(torch.rand(3), expected_rand[0]) and random.random() == expected_rand[1]


def test_crash_mid_save_never_breaks_latest(engine, tmp_path):
    root = tmp_path / "ckpt"
    train_step(engine)
    checkpoint.save(engine, root, 1, {"step": 1, "epoch": 0}, keep=3)
    # a save that died before COMPLETE: newer folder, `latest` even pointing at it
    (root / "step_00000002").mkdir()
    (root / "step_00000002" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert checkpoint.find_latest(root) == "step_00000001"
    (root / "latest").write_text("step_00000002\n")
    assert checkpoint.find_latest(root) == "step_00000001"
    (root / "latest").unlink()
    assert checkpoint.find_latest(root) == "step_00000001"
    assert checkpoint.find_latest(tmp_path / "nothing") is None
