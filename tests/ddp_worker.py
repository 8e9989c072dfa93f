"""A DDP training step on CPU (gloo), run in a child process by test_accelerated."""

import os

import torch
import torch.distributed as dist


def ddp_step(rank: int, world: int, init_file: str, out_dir: str, arch: dict, batch: torch.Tensor) -> None:
    import transxnet

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = transxnet.accelerated(transxnet.TransXNet(arch, num_classes=3)).train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        shard = batch.chunk(world)[rank]
        ddp(shard).square().mean().backward()
        torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()
