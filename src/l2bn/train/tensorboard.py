"""TensorBoard event files of a run, written from its per-epoch records (``tensorboard --logdir runs/``).

Optional: with the ``tensorboard`` extra installed, every record that goes to ``metrics.jsonl`` also goes to
``<run>/tensorboard/`` through :class:`torch.utils.tensorboard.SummaryWriter`, one scalar per number at step
= epoch: ``lr``, ``train_loss``, ``test_acc``, ``val_acc``, ``intra_train``, ``iir_test``, ``cone_train``, …;
dicts and lists become one scalar per entry (``norm_cv/<layer>``, ``test_class_acc/<class>``); the
per-device confusion counts are left to the report's figure. A process
keeps one writer open, for the run it writes now; the first record a writer takes (a fresh start or a resume)
purges the steps from that epoch on, so a resumed run shows each epoch once.
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = ["NOT_PLOTTED", "TENSORBOARD_DIR", "scalars", "write_record"]

TENSORBOARD_DIR = "tensorboard"

NOT_PLOTTED = ("epoch", "test_confusion")  # the step itself; per-device count matrices (a figure, not a curve)
_open: dict[str, Any] = {}  # the writer of this process's current run: folder, next epoch, writer


def scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every number in ``record`` outside :data:`NOT_PLOTTED`, nested dicts and lists flattened
    with '/'."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if tag in NOT_PLOTTED:
            continue
        if isinstance(value, dict):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, (list, tuple)):
            yield from scalars(dict(enumerate(value)), f"{tag}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield tag, float(value)


def write_record(run_path: Path, record: dict[str, Any]) -> bool:
    """Add one per-epoch record to the run's event files; False (nothing written) without tensorboard."""
    if importlib.util.find_spec("tensorboard") is None:
        return False
    from torch.utils.tensorboard import SummaryWriter

    folder, epoch = str(Path(run_path) / TENSORBOARD_DIR), int(record["epoch"])
    if _open.get("folder") != folder or _open.get("next_epoch") != epoch:
        if "writer" in _open:
            _open["writer"].close()
        _after_existing_files(Path(folder))
        _open.update(folder=folder, writer=SummaryWriter(folder, purge_step=epoch))
    writer = _open["writer"]
    for tag, value in scalars(record):
        writer.add_scalar(tag, value, global_step=epoch)
    writer.flush()
    _open["next_epoch"] = epoch + 1
    return True


def _after_existing_files(folder: Path) -> None:
    """Event files load in name order, which starts with the second they were created: a new file starts in a
    later second than the folder's others, so its purge comes after the steps it replaces."""
    seconds = [int(p.name.split(".")[3]) for p in folder.glob("events.out.tfevents.*")]
    wait = max(seconds, default=0) + 1 - time.time()
    if wait > 0:
        time.sleep(wait)
