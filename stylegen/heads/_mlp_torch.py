"""Training side of :class:`stylegen.heads.mlp.MLPHead`: the torch network and its loop.

Only ``MLPHead.fit`` imports this module. A fitted head keeps its weights as numpy arrays
(:func:`to_weights`), so loading and predicting never import torch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from stylegen.errors import DataError

Layers = list[tuple[np.ndarray, np.ndarray]]


def _dense(n_in: int, sizes: Sequence[int], dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for n_out in sizes:
        layers += [nn.Linear(n_in, n_out), nn.ReLU(), nn.Dropout(dropout)]
        n_in = n_out
    return layers


class Net(nn.Module):
    """[image | tabular branch(table)] -> dense layers -> logits."""

    def __init__(self, n_image: int, n_table: int, n_out: int, hidden: Sequence[int],
                 tabular_hidden: Sequence[int], dropout: float) -> None:
        super().__init__()
        self.table = nn.Sequential(*_dense(n_table, tabular_hidden, dropout)) if n_table else None
        n_in = n_image + ((list(tabular_hidden) or [n_table])[-1] if n_table else 0)
        self.body = nn.Sequential(*_dense(n_in, hidden, dropout),
                                  nn.Linear((list(hidden) or [n_in])[-1], n_out))

    def forward(self, image: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        parts = [image] if self.table is None else [image, self.table(table)]
        return self.body(torch.cat(parts, dim=1))


def to_weights(net: Net) -> dict[str, Layers]:
    """The network's Linear layers as float32 (weight, bias) pairs, branch by branch."""
    def linear(seq: nn.Module | None) -> Layers:
        return [] if seq is None else [
            (m.weight.detach().cpu().numpy().copy(), m.bias.detach().cpu().numpy().copy())
            for m in seq if isinstance(m, nn.Linear)]
    return {"table": linear(net.table), "body": linear(net.body)}


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def loss_fn(targets: np.ndarray, n_classes: int, multi_label: bool,
            class_weight: str | None) -> nn.Module:
    if class_weight not in ("balanced", None):
        raise DataError(f"class_weight must be 'balanced' or None, got {class_weight!r}")
    balanced = class_weight == "balanced"
    if multi_label:
        pos = targets.sum(0)
        weight = (len(targets) - pos) / np.maximum(pos, 1) if balanced else None
        return nn.BCEWithLogitsLoss(pos_weight=None if weight is None else _tensor(weight))
    counts = np.bincount(targets, minlength=n_classes)
    weight = len(targets) / (len(counts) * np.maximum(counts, 1)) if balanced else None
    return nn.CrossEntropyLoss(weight=None if weight is None else _tensor(weight))


def fit_net(head: object, image: np.ndarray, table: np.ndarray, targets: np.ndarray,
            n_classes: int, train: np.ndarray, val: np.ndarray,
            seed: int) -> tuple[dict[str, Layers], list[float]]:
    """Train one network with ``head``'s settings; (best weights, validation loss per epoch).

    Seeded by ``seed`` without touching torch's global RNG.
    """
    device = torch.device(head.device)
    with threads(head.num_threads), torch.random.fork_rng(
            devices=[] if device.type == "cpu" else None):
        torch.manual_seed(seed)
        net = Net(image.shape[1], table.shape[1], n_classes, head.hidden,
                  head.tabular_hidden, head.dropout).to(device)
        history = _train(head, net, image, table, targets, n_classes, train, val, seed)
    return to_weights(net), history


def _train(head: object, net: Net, image: np.ndarray, table: np.ndarray, targets: np.ndarray,
           n_classes: int, train: np.ndarray, val: np.ndarray, seed: int) -> list[float]:
    """Train in place; restore the best weights; return the validation loss per epoch."""
    device = next(net.parameters()).device
    loss = loss_fn(targets[train], n_classes, head.multi_label, head.class_weight).to(device)
    y = torch.as_tensor(targets, dtype=torch.float32 if head.multi_label else torch.long)
    image_t, table_t = torch.as_tensor(image), torch.as_tensor(table)
    optimizer = torch.optim.AdamW(net.parameters(), lr=head.lr, weight_decay=head.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    train_rows = torch.as_tensor(train)
    history: list[float] = []
    best_state, best_loss = None, np.inf
    for _ in range(head.max_epochs):
        net.train()
        for batch in train_rows[torch.randperm(len(train), generator=generator)].split(
                head.batch_size):
            optimizer.zero_grad()
            logits = net(image_t[batch].to(device), table_t[batch].to(device))
            loss(logits, y[batch].to(device)).backward()
            optimizer.step()
        if not len(val):
            history.append(np.nan)
            continue
        logits = _logits(net, image_t[val], table_t[val], head.batch_size)
        history.append(float(loss(logits, y[val].to(device))))
        if history[-1] < best_loss:
            best_loss, best_state = history[-1], copy.deepcopy(net.state_dict())
        elif len(history) - 1 - int(np.argmin(history)) >= head.patience:
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return history


def _tensor(values: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32)


@torch.no_grad()
def _logits(net: Net, image: torch.Tensor, table: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Evaluation-mode logits, batch by batch, on the network's device."""
    net.eval()
    device = next(net.parameters()).device
    return torch.cat([net(i.to(device), t.to(device)) for i, t in
                      zip(image.split(batch_size), table.split(batch_size))])
