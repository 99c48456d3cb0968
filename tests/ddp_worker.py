"""Run by `accelerate launch --multi_gpu --num_processes 2` in test_training: each rank logs the images it saw."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from models.registry import build_model
from pipelines.config import TrainSettings
from pipelines.training import fit, make_accelerator


class Indexed(Dataset):
    """Random 16 px 'images' whose label is a function of their index; the batch carries the indices."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, 16, 16, generator=g)
        self.y = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def main(out: Path) -> None:
    settings = TrainSettings(epochs=2, batch_size=4, lr=1e-2, warmup_epochs=0, device="cpu", seed=0, resume=False,
                             ema_decay=0.0)
    accelerator = make_accelerator(settings)
    seen: list[int] = []

    def forward(model, batch):
        images, labels, index = batch
        if model.training:
            seen.extend(index.tolist())
        return model(images), labels

    model = build_model("small-cnn", 3, 16, widths=(4,))
    train = DataLoader(Indexed(32), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(Indexed(8), batch_size=4)
    result = fit(model, train, val, torch.nn.CrossEntropyLoss(), settings, out / "run", accelerator, forward=forward)
    rank = accelerator.process_index
    (out / f"seen_{rank}.json").write_text(json.dumps(seen))
    save_file(
        {k: v.contiguous() for k, v in result.model.state_dict().items()}, str(out / f"weights_{rank}.safetensors")
    )
    (out / f"world_{rank}.txt").write_text(f"{accelerator.num_processes} {accelerator.state.distributed_type.value}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
