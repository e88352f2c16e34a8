"""A dependency-free writer of TensorBoard event files holding scalar summaries.

Why not a library: TensorFlow is far too heavy for a JAX trainer, tensorboardX would be a new
runtime dependency for ~100 lines of framing, and the `tensorboard` package is only the viewer
(its internal writer is not a public API). The format is small and stable:

* An event file is a sequence of TFRecords: `uint64 length | uint32 masked_crc32c(length) | data |
  uint32 masked_crc32c(data)`, little-endian.
* Each record's data is a serialized `tensorflow.Event` protobuf. We only need a handful of fields,
  so we encode them by hand (protobuf wire format) instead of depending on generated code:

      Event      { double wall_time = 1; int64 step = 2; string file_version = 3;
                   Summary summary = 5; SessionLog session_log = 7; }
      Summary    { repeated Value value = 1; }
      Value      { string tag = 1; float simple_value = 2; }
      SessionLog { SessionStatus status = 1; }   // START = 1

The tests decode what we write with tensorboard's own `EventAccumulator` and compare our bytes with
the generated protobuf classes, so a wire-format slip cannot pass unnoticed.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import BinaryIO

_FILE_VERSION = "brain.Event:2"
_SESSION_START = 1
_file_counter = 0


def _make_crc32c_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # Castagnoli polynomial, bit-reversed.
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli). Pure Python: records are a few hundred bytes, so speed is moot."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    # TFRecord masks the CRC so that CRCs of data containing CRCs stay well distributed.
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """Frames one record the way TensorFlow's RecordWriter does."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 negatives are encoded as their 64-bit two's complement.
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _event_header(wall_time: float, step: int) -> bytes:
    return _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)


def encode_scalars_event(wall_time: float, step: int, scalars: Mapping[str, float]) -> bytes:
    """One Event whose Summary holds one simple_value per tag (a single record per step)."""
    values = b"".join(
        _length_delimited(
            1, _length_delimited(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(value))
        )
        for tag, value in scalars.items()
    )
    return _event_header(wall_time, step) + _length_delimited(5, values)


def encode_file_version_event(wall_time: float) -> bytes:
    return _key(1, 1) + struct.pack("<d", wall_time) + _length_delimited(3, _FILE_VERSION.encode())


def encode_session_start_event(wall_time: float, step: int) -> bytes:
    # TensorBoard purges previously loaded events with step >= `step` when it reads a START
    # SessionLog, which is exactly what a resumed run needs: the steps re-run after the restored
    # checkpoint replace the ones the killed run logged.
    session_log = _key(1, 0) + _varint(_SESSION_START)
    return _event_header(wall_time, step) + _length_delimited(7, session_log)


class EventFileWriter:
    """Appends scalar events to a new `events.out.tfevents.*` file in `logdir`."""

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        global _file_counter
        os.makedirs(logdir, exist_ok=True)
        now = time.time()
        # Same naming scheme as TensorFlow: TensorBoard orders files by name, so the timestamp
        # leads; the counter keeps two writers opened within one second in one process apart.
        host, pid = socket.gethostname(), os.getpid()
        name = f"events.out.tfevents.{int(now):010d}.{host}.{pid}.{_file_counter:03d}"
        _file_counter += 1
        self.path = os.path.join(os.fspath(logdir), name)
        self._file: BinaryIO | None = open(self.path, "wb")
        self._file.write(tfrecord(encode_file_version_event(now)))
        self._started = False

    def add_scalars(
        self, step: int, scalars: Mapping[str, float], wall_time: float | None = None
    ) -> None:
        if self._file is None:
            raise ValueError(f"event file {self.path} is closed")
        wall_time = time.time() if wall_time is None else wall_time
        if not self._started:
            self._file.write(tfrecord(encode_session_start_event(wall_time, step)))
            self._started = True
        if scalars:
            self._file.write(tfrecord(encode_scalars_event(wall_time, step, scalars)))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
