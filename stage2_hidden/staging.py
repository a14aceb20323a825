"""Device->host staging ring: a forward's outputs copied into reusable pinned host buffers.

On CUDA ``HostStaging.stage`` quantises (fp8 storage) or casts (bf16) the outputs where the forward ran, then
copies them on a side stream into one of a ring of pinned buffers and returns a ``Staged`` at once; the shard
writer thread waits on the copy's event and hands the buffer back with ``release()``. So the copy overlaps the
next forward, the host loop never synchronises with the device, and a full ring is the back-pressure that
bounds how far the forwards run ahead of the disk. On CPU nothing is copied: ``Staged`` holds the tensors.

A buffer is one uint8 block laid out as hidden [T, W], targets int32 [T], fp8 scales fp32 [T, num_aux]
(``staging_bytes`` / ``staging_views`` / ``scale_view``), each region on a 64-byte boundary.
"""
from __future__ import annotations

import queue
from dataclasses import dataclass

import torch

from .format import quantize_fp8


@dataclass
class Staged:
    """A forward's outputs on the host, as stored: ``hidden_TW`` bf16 (or float8_e4m3fn with ``scale_TL`` fp32
    [T, num_aux]) [T, W], ``target_T`` int32 [T]. On CUDA they live in a pinned ring buffer that ``release()``
    returns, and are valid once ``wait()`` returns."""
    hidden_TW: torch.Tensor
    target_T: torch.Tensor
    scale_TL: "torch.Tensor | None" = None
    event: "torch.cuda.Event | None" = None
    _ring: "queue.Queue | None" = None
    _slot: "list | None" = None

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()  # releases the GIL

    def release(self) -> None:
        if self._ring is not None:
            self._ring.put(self._slot)
            self._ring = None


def _pad64(n: int) -> int:
    return (n + 63) // 64 * 64


def staging_bytes(T: int, W: int, itemsize: int = 2, num_scales: int = 0) -> int:
    """Bytes of one staging buffer: hidden [T, W] (itemsize bytes each), targets int32 [T], then fp8 scales fp32
    [T, num_scales], each region starting on a 64-byte boundary."""
    return _pad64(T * W * itemsize) + _pad64(T * 4) + T * num_scales * 4


def staging_views(buf: torch.Tensor, T: int, W: int, itemsize: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [T, W] (bf16, or float8_e4m3fn for itemsize 1), target int32 [T]) views at the start of ``buf``."""
    off = _pad64(T * W * itemsize)
    dtype = torch.bfloat16 if itemsize == 2 else torch.float8_e4m3fn
    return buf[: T * W * itemsize].view(dtype).view(T, W), buf[off: off + T * 4].view(torch.int32)


def scale_view(buf: torch.Tensor, T: int, W: int, num_scales: int) -> torch.Tensor:
    """The fp32 [T, num_scales] scale region of an fp8 staging buffer (after hidden and targets)."""
    off = _pad64(T * W) + _pad64(T * 4)
    return buf[off: off + T * num_scales * 4].view(torch.float32).view(T, num_scales)


class HostStaging:
    """Device->host copies of a forward's outputs into a ring of ``num_buffers`` reusable pinned buffers.

    The copy runs on a side stream (ordered after the forward by ``wait_stream``), so it overlaps the next
    forward instead of delaying it, and the host thread never waits for the device: the writer waits on
    the copy's event. ``stage`` blocks while every buffer is still being written (back-pressure); buffers
    are allocated once, at ``reserve_tokens`` tokens or the largest forward seen."""

    def __init__(self, num_buffers: int = 3, reserve_tokens: int = 0, width: int = 0, device=None,
                 storage: str = "bfloat16", num_aux: int = 3):
        self.free: queue.Queue = queue.Queue()
        self.reserve_tokens = int(reserve_tokens)
        self.fp8, self.num_aux = storage == "float8_e4m3", num_aux
        self.itemsize, self.num_scales = (1, num_aux) if self.fp8 else (2, 0)
        self._streams: dict = {}
        for _ in range(max(1, num_buffers)):
            slot = [None]  # [pinned uint8 buffer]
            if device is not None and torch.device(device).type == "cuda" and reserve_tokens and width:
                slot[0] = self._alloc(self._bytes(self.reserve_tokens, width))
            self.free.put(slot)

    def _bytes(self, T: int, W: int) -> int:
        return staging_bytes(T, W, self.itemsize, self.num_scales)

    @staticmethod
    def _alloc(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def stage(self, hidden_TW: torch.Tensor, target_T: torch.Tensor) -> Staged:
        scale_TL = None
        if self.fp8:  # quantised where the forward ran: the copy moves half the bytes
            hidden_TW, scale_TL = quantize_fp8(hidden_TW, self.num_aux)
        else:
            hidden_TW = hidden_TW.to(torch.bfloat16)
        if not hidden_TW.is_cuda:
            return Staged(hidden_TW, target_T.to(torch.int32), scale_TL)
        T, W = hidden_TW.shape
        slot = self.free.get()
        if slot[0] is None or slot[0].numel() < self._bytes(T, W):
            slot[0] = self._alloc(self._bytes(max(T, self.reserve_tokens), W))
        host_TW, host_T = staging_views(slot[0], T, W, self.itemsize)
        host_TL = scale_view(slot[0], T, W, self.num_scales) if self.fp8 else None
        device = hidden_TW.device
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            host_TW.copy_(hidden_TW, non_blocking=True)
            host_T.copy_(target_T.to(torch.int32), non_blocking=True)
            if host_TL is not None:
                host_TL.copy_(scale_TL, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        for t in (hidden_TW, target_T, scale_TL):  # the allocator must not reuse them before the copy read them
            if t is not None:
                t.record_stream(stream)
        return Staged(host_TW, host_T, host_TL, event, self.free, slot)
