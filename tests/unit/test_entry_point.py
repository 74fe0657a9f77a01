"""The entry point (``__main__``): what a finished command leaves behind."""

from __future__ import annotations

from amax_lightning.__main__ import main


def test_a_finished_command_destroys_the_process_group(tmp_path):
    """A command that ends normally leaves no DDP process group for the interpreter's exit to tear down."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    main(["--help"])
    assert not dist.is_initialized()
