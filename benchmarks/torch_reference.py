"""The PyTorch reference for `benchmarks.vs_torch`: the same classic CNN under DDP (gloo).

Standalone on purpose (imports only torch, numpy and the standard library) so it can run under
another interpreter: `python benchmarks/torch_reference.py --processes 2 --steps 60`. It prints
one JSON line with the measured images/s. So its command line is plain `argparse`, not
`benchmarks.harness` (which imports jaxdist, and so jax).

`--data random` times steps on random uint8 batches; `--data PATH.npz` (arrays `images` uint8
NHWC, `labels`) feeds real MNIST through PyTorch's usual input path, a `DataLoader` over a
`TensorDataset` with a `DistributedSampler`, normalising on the fly like the JAX side.

`--train_epochs E --test PATH.npz` trains to accuracy instead, with jaxdist's default recipe (Adam,
one-cycle cosine schedule with the same warm-up fraction and the same div factors as
`optax.cosine_onecycle_schedule`, no momentum cycling); after each epoch it evaluates on the test
set (not timed) and prints a JSON line with the cumulative training seconds (data included).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _net():
    import torch.nn as nn
    import torch.nn.functional as F

    class Net(nn.Module):
        """conv 1->10 5x5, pool, ReLU; conv 10->20 5x5, pool, ReLU; 320->50, ReLU; 50->10."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 10, 5)
            self.conv2 = nn.Conv2d(10, 20, 5)
            self.fc1 = nn.Linear(320, 50)
            self.fc2 = nn.Linear(50, 10)

        def forward(self, x):
            x = F.relu(F.max_pool2d(self.conv1(x), 2))
            x = F.relu(F.max_pool2d(self.conv2(x), 2))
            x = F.relu(self.fc1(x.flatten(1)))
            return F.log_softmax(self.fc2(x), dim=1)

    return Net()


def _batches(args, rank: int, world: int):
    """Yields (images float NCHW normalised, labels) of this rank's share, forever."""
    import numpy as np
    import torch

    local = args.global_batch // world
    if args.data == "random":
        rng = np.random.default_rng(rank)
        pool = [(torch.from_numpy(rng.integers(0, 256, (local, 1, 28, 28), dtype=np.uint8)),
                 torch.from_numpy(rng.integers(0, 10, local).astype(np.int64))) for _ in range(8)]
        while True:
            for images, labels in pool:
                yield (images.float() / 255.0 - MNIST_MEAN) / MNIST_STD, labels
    data = np.load(args.data)
    images = torch.from_numpy(np.ascontiguousarray(data["images"].transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(data["labels"].astype(np.int64))
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    dataset = TensorDataset(images, labels)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed,
                                 drop_last=True)
    loader = DataLoader(dataset, batch_size=local, sampler=sampler, drop_last=True)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for images, labels in loader:
            yield (images.float() / 255.0 - MNIST_MEAN) / MNIST_STD, labels
        epoch += 1


def _accuracy(model, test) -> float:
    import torch

    images, labels = test
    model.eval()
    with torch.no_grad():
        correct = sum(int((model((x.float() / 255.0 - MNIST_MEAN) / MNIST_STD).argmax(1) == y).sum())
                      for x, y in zip(images.split(2000), labels.split(2000)))
    model.train()
    return correct / len(labels)


def _train_to_accuracy(rank: int, world: int, args, model, batches):
    """Trains `args.train_epochs` epochs; rank 0 prints a JSON line per epoch."""
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    data = np.load(args.test)
    test = (torch.from_numpy(np.ascontiguousarray(data["images"].transpose(0, 3, 1, 2))),
            torch.from_numpy(data["labels"].astype(np.int64)))
    steps_per_epoch = -(-len(np.load(args.data)["labels"]) // args.global_batch)
    total = steps_per_epoch * args.train_epochs
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=total, pct_start=args.warmup_fraction,
        anneal_strategy="cos", cycle_momentum=False, div_factor=25.0, final_div_factor=1e4)
    seconds = 0.0
    for epoch in range(1, args.train_epochs + 1):
        start = time.perf_counter()
        for _ in range(steps_per_epoch):
            images, labels = next(batches)
            opt.zero_grad(set_to_none=True)
            F.nll_loss(model(images), labels).backward()
            opt.step()
            schedule.step()
        if world > 1:
            dist.barrier()
        seconds += time.perf_counter() - start
        if rank == 0:
            net = model.module if world > 1 else model
            print(json.dumps({"epoch": epoch, "train_seconds": seconds,
                              "test_accuracy": _accuracy(net, test)}), flush=True)
        if world > 1:
            dist.barrier()


def _worker(rank: int, world: int, args, port: int, results):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    model = _net()
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    if args.compile:  # Inductor's C++ kernels; the warm-up steps pay for the compilation
        model = torch.compile(model)
    batches = _batches(args, rank, world)
    if args.train_epochs:
        _train_to_accuracy(rank, world, args, model, batches)
        if world > 1:
            dist.destroy_process_group()
        return
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    def step():
        images, labels = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = F.nll_loss(model(images), labels)
        loss.backward()
        opt.step()
        return loss.detach()

    for _ in range(args.warmup):
        step()
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()  # wait for the last step
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        results.put(args.steps * args.global_batch / seconds)
    if world > 1:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=1, help="DDP processes (1: no DDP)")
    parser.add_argument("--global_batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="intra-op threads in all, split between processes")
    parser.add_argument("--data", default="random", help="'random' or an MNIST .npz")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--seed", type=int, default=0, help="initialization and data order")
    parser.add_argument("--train_epochs", type=int, default=0,
                        help="train to accuracy for this many epochs (needs --data and --test)")
    parser.add_argument("--test", default=None, help="MNIST test split .npz (with --train_epochs)")
    parser.add_argument("--warmup_fraction", type=float, default=0.15,
                        help="one-cycle warm-up fraction (with --train_epochs)")
    args = parser.parse_args(argv)
    if args.train_epochs and (args.data == "random" or not args.test):
        parser.error("--train_epochs needs --data TRAIN.npz and --test TEST.npz")
    if args.global_batch % args.processes:
        parser.error(f"global batch {args.global_batch} does not divide over {args.processes}")
    import torch
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    if args.processes == 1:
        _worker(0, 1, args, 0, results)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(args.processes, args, port, results), nprocs=args.processes)
    if not args.train_epochs:
        print(json.dumps({"framework": f"torch {torch.__version__}", "processes": args.processes,
                          "images_per_second": results.get()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
