"""Class weights, losses, the trainer's resume after an interruption, and a two-process Accelerate run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipelines.training import class_weights, train_from_config
from tests.conftest import REPO, tiny_config


def test_class_weights_on_a_known_count_vector():
    counts = [100, 10, 1]
    inverse = class_weights(counts, "inverse")
    expected = torch.tensor([0.01, 0.1, 1.0]) / torch.tensor([0.01, 0.1, 1.0]).mean()
    assert torch.allclose(inverse, expected)
    beta = 0.9
    effective = class_weights(counts, "effective", beta)
    raw = torch.tensor([(1 - beta) / (1 - beta**n) for n in counts], dtype=torch.float64)
    assert torch.allclose(effective.double(), raw / raw.mean(), atol=1e-6)
    assert effective[2] > effective[1] > effective[0]
    with pytest.raises(ValueError, match="at least one training sample"):
        class_weights([5, 0], "inverse")


def test_training_writes_bundle_report_and_threshold(tiny_bundle):
    card = json.loads((tiny_bundle / "card.json").read_text())
    assert card["class_names"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert card["malignant_classes"] == ["mel", "bcc", "akiec"]
    assert 0.0 <= card["operating_threshold"] <= 1.0
    assert card["threshold_metrics"]["sensitivity"] >= 0.9
    assert len(card["manifest_sha256"]) == 64
    assert {"validation", "test"} <= set(card["metrics"])
    report = tiny_bundle.parent / "report"
    assert {"report.md", "report.json", "roc.png", "confusion_matrix.png", "reliability.png"} <= {
        p.name for p in report.iterdir()
    }
    assert "| df | 12 | 0 |" in (report / "report.md").read_text()  # real vs synthetic counts per class


class Interrupt(Exception):
    pass


def test_resume_after_interruption_continues_and_matches_an_uninterrupted_run(small_manifest, tmp_path, monkeypatch):
    import pipelines.training.train as training

    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    train_from_config(tiny_config(full_dir, epochs=3), full_dir, small_manifest)

    real_fit = training.fit

    def fit_killed_after_two_epochs(*args, **kwargs):
        def stop(epoch, total):
            if epoch == 2:
                raise Interrupt("killed")

        return real_fit(*args, **kwargs, on_epoch_start=stop)

    monkeypatch.setattr(training, "fit", fit_killed_after_two_epochs)
    with pytest.raises(Interrupt):
        train_from_config(tiny_config(cut_dir, epochs=3), cut_dir, small_manifest)
    state = json.loads((cut_dir / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and not (cut_dir / "bundle").exists()
    monkeypatch.setattr(training, "fit", real_fit)

    bundle = train_from_config(tiny_config(cut_dir, epochs=3), cut_dir, small_manifest)
    history = json.loads((cut_dir / "report" / "report.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # the finished epochs were kept, not redone
    full = load_file(full_dir / "bundle" / "weights.safetensors")
    resumed = load_file(bundle / "weights.safetensors")
    assert all(torch.allclose(full[k].float(), resumed[k].float(), atol=1e-5) for k in full)


def test_two_process_accelerate_run_shards_data_and_ends_with_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [
        *accelerate,
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "tests" / "ddp_worker.py"),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # the launcher's closing summary hides a failing rank's traceback; show each rank's own lines first
    rank_lines = "\n".join(line for line in done.stderr.splitlines() if line.startswith("[rank"))
    assert done.returncode == 0, rank_lines[-4000:] + "\n" + done.stderr[-1500:]
    assert (tmp_path / "world_0.txt").read_text() == "2 MULTI_CPU"
    # the last checkpoint holds both ranks' random states (rank 0 used to swap the folder in before rank 1 wrote)
    last = tmp_path / "run" / "checkpoints" / "last"
    assert {p.name for p in last.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    seen = [json.loads((tmp_path / f"seen_{r}.json").read_text()) for r in (0, 1)]
    for epoch in range(2):  # 32 images, 4 per batch per rank -> 16 per rank per epoch
        per_rank = [set(s[epoch * 16 : (epoch + 1) * 16]) for s in seen]
        assert per_rank[0].isdisjoint(per_rank[1])
        assert per_rank[0] | per_rank[1] == set(range(32))
    w0 = load_file(tmp_path / "weights_0.safetensors")
    w1 = load_file(tmp_path / "weights_1.safetensors")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_a_tie_in_balanced_accuracy_goes_to_the_lower_validation_loss(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from pipelines.config import TrainSettings
    from pipelines.training import fit

    torch.manual_seed(0)
    x = torch.randn(32, 4)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    settings = TrainSettings(epochs=6, lr=0.05, warmup_epochs=0, device="cpu", resume=False, patience=10)
    result = fit(torch.nn.Linear(4, 2), loader, loader, torch.nn.CrossEntropyLoss(), settings, tmp_path)
    history = result.history
    best = max(h["val_balanced_accuracy"] for h in history)
    tied = [h for h in history if h["val_balanced_accuracy"] == best]
    assert len(tied) > 1  # this separable problem saturates early, so several epochs tie
    assert result.best_epoch == min(tied, key=lambda h: h["val_loss"])["epoch"]
    assert result.best_epoch != tied[0]["epoch"]


def test_ema_is_what_is_validated_and_shipped_and_raw_weights_are_kept(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from pipelines.config import TrainSettings
    from pipelines.training import fit

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    settings = TrainSettings(epochs=3, lr=0.05, warmup_epochs=0, device="cpu", resume=False, ema_decay=0.9)
    result = fit(torch.nn.Linear(4, 2), loader, loader, torch.nn.CrossEntropyLoss(), settings, tmp_path)
    raw = load_file(result.raw_weights)
    best = load_file(tmp_path / "checkpoints" / "best.safetensors")
    shipped = result.model.state_dict()
    assert torch.equal(shipped["weight"], best["weight"])
    assert not torch.allclose(raw["weight"], best["weight"])  # the EMA lags the raw weights
    assert (tmp_path / "checkpoints" / "last" / "ema.safetensors").is_file()
    # The raw weights of the selected epoch are kept too: after one epoch they are the last raw weights.
    one = fit(torch.nn.Linear(4, 2), loader, loader, torch.nn.CrossEntropyLoss(),
              settings.model_copy(update={"epochs": 1}), tmp_path / "one")
    best_raw = load_file(tmp_path / "one" / "checkpoints" / "best_raw.safetensors")
    assert torch.equal(best_raw["weight"], load_file(one.raw_weights)["weight"])
    assert not torch.allclose(best_raw["weight"], one.model.state_dict()["weight"])
    off = fit(torch.nn.Linear(4, 2), loader, loader, torch.nn.CrossEntropyLoss(),
              settings.model_copy(update={"ema_decay": 0.0}), tmp_path / "off")
    assert off.raw_weights is None
    assert not (tmp_path / "off" / "checkpoints" / "best_raw.safetensors").exists()


def test_ema_decay_warms_up_and_matches_a_hand_computed_average():
    from pipelines.training import ema_update

    update = ema_update(0.99)
    ema, target = [torch.zeros(3)], [torch.ones(3)]
    update(ema, target, torch.tensor(0))  # n = 0: decay min(0.99, 1/10) = 0.1, so the EMA moves 90 %
    assert torch.allclose(ema[0], torch.full((3,), 0.9))
    update(ema, [torch.zeros(3)], torch.tensor(1000))  # later the decay is the configured 0.99
    assert torch.allclose(ema[0], torch.full((3,), 0.9 * 0.99))


def test_schedule_is_planned_to_finish_inside_the_time_budget(tmp_path, monkeypatch):
    from torch.utils.data import DataLoader, TensorDataset

    import pipelines.training.loop as training
    from pipelines.config import TrainSettings
    from pipelines.training import epochs_within_budget

    assert epochs_within_budget(60, 7.0, 20) == 8
    assert epochs_within_budget(60, 70.0, 20) == 1
    assert epochs_within_budget(600, 7.0, 20) == 20
    clock = iter(range(0, 10_000, 30))  # every perf_counter() call advances 30 s
    monkeypatch.setattr(training.time, "perf_counter", lambda: float(next(clock)))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    settings = TrainSettings(epochs=20, lr=0.01, warmup_epochs=0, device="cpu", resume=False, patience=50,
                             time_budget_minutes=12.0, ema_decay=0.0)
    result = training.fit(torch.nn.Linear(4, 2), loader, loader, torch.nn.CrossEntropyLoss(), settings, tmp_path)
    assert 1 <= result.planned_epochs < 20
    assert len(result.history) == result.planned_epochs
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine reached 0 at the planned end


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0)])
def test_mixup_and_cutmix_mix_images_and_losses_by_the_same_lambda(mixup, cutmix):
    from pipelines.training import mixing_loss_forward

    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, images):
            seen["images"] = images
            return images.flatten(1)[:, :3]

    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    labels = torch.tensor([0, 1, 2, 0])
    loss_forward = mixing_loss_forward(torch.nn.functional.cross_entropy, mixup, cutmix, prob=1.0, seed=0)
    loss = loss_forward(Recorder(), (images, labels), 0)
    assert torch.isfinite(loss)
    mixed = seen["images"]
    assert not torch.equal(mixed, images)
    if cutmix:  # each pixel comes from one of two images: values stay whole numbers
        assert torch.equal(mixed, mixed.round())
    with pytest.raises(ValueError, match="mixup_alpha or cutmix_alpha"):
        mixing_loss_forward(torch.nn.functional.cross_entropy, 0.0, 0.0, 0.5)
