"""Reading an offline wandb run back in tests (wandb 0.31 has no Python reader for it)."""
from pathlib import Path


def wandb_records(path: Path):
    """The records of an offline ``run-*.wandb`` file: a LevelDB log, 32 KiB blocks of chunks
    with a 7-byte header (CRC, length, type); a record is one FULL (1) chunk or FIRST (2),
    MIDDLE (3)..., LAST (4); a block's tail too short for a header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb transaction log"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        n, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            yield pb.Record.FromString(buf)
            buf = b""
