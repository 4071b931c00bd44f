"""The Lightning plugin: L2BN synchronised across 2 gloo CPU processes by a real Trainer (ddp_spawn), equal to
one process on the whole batch; plain BN converted too; everything reverted after fit. Skipped without lightning."""
from __future__ import annotations

import pytest
import torch
from torch import nn

lightning = pytest.importorskip("lightning")

import l2bn  # noqa: E402
from l2bn.lightning_sync import SyncL2BN  # noqa: E402

BATCH = 4  # per process


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), l2bn.L2BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def _data() -> torch.Tensor:
    return torch.randn(2 * BATCH, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 3 + 1


class _Module(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.net(torch.zeros(1, 3, 6, 6))  # materialise the lazy layer
        self.seen: list[str] = []

    def training_step(self, batch, _):
        self.seen.append(type(self.net[1]).__name__)
        assert self.seen[-1] == "SyncL2BatchNorm", self.seen  # converted while fitting
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # statistics move, weights do not

    def train_dataloader(self):
        dataset = torch.utils.data.TensorDataset(_data())
        return torch.utils.data.DataLoader(dataset, batch_size=BATCH)  # Lightning adds a DistributedSampler


def test_trainer_with_the_plugin_synchronises_l2bn_across_processes(tmp_path):
    module = _Module()
    trainer = lightning.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", plugins=[SyncL2BN()], max_steps=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module)
    assert type(module.net[1]) is l2bn.L2BatchNorm2d  # reverted (rank 0's weights come back into this process)

    # one process, the whole batch of both ranks (batch norm statistics do not depend on the order of samples)
    reference = _net()
    reference(torch.zeros(1, 3, 6, 6))
    reference.load_state_dict({k: v for k, v in _Module().net.state_dict().items()})
    reference.train()
    with torch.no_grad():
        reference(_data())
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(module.net[1], name), getattr(reference[1], name), rtol=1e-5, atol=1e-6)
    # not a local statistic: one rank's half alone gives other running statistics
    half = _net()
    half(torch.zeros(1, 3, 6, 6))
    half.load_state_dict(_Module().net.state_dict())
    with torch.no_grad():
        half(_data()[::2])
    assert not torch.allclose(half[1].running_var, reference[1].running_var, rtol=1e-3)


def test_plugin_converts_and_reverts_both_kinds_keeping_parameters():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), l2bn.L2BatchNorm1d(8), nn.BatchNorm3d(8), nn.BatchNorm2d(8, affine=False))
    weights = [net[1].weight, net[2].weight]
    plugin = SyncL2BN()
    synced = plugin.apply(net)
    assert [type(m).__name__ for m in synced][1:] == ["SyncL2BatchNorm", "SyncBatchNorm", "SyncBatchNorm"]
    assert synced[1].weight is weights[0] and synced[2].weight is weights[1]  # an optimizer keeps working
    back = plugin.revert(synced)
    assert [type(m) for m in back][1:] == [l2bn.L2BatchNorm1d, nn.BatchNorm3d, nn.BatchNorm2d]
    assert back[1].weight is weights[0] and back[2].weight is weights[1] and back[3].weight is None


def test_lightning_refuses_the_plugin_with_sync_batchnorm():
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="sync_batchnorm=True"):
        lightning.Trainer(accelerator="cpu", sync_batchnorm=True, plugins=[SyncL2BN()], logger=False)
