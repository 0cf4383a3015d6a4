"""arcbox_net.wire.checksum with numpy (arcbox-net[fast]) and without it.

numpy is an optional extra, so the pure-Python big-int sum is a real path for
users who install plain ``arcbox-net``. Each test runs twice: once with the
module as imported (numpy above 4 KiB), once reloaded with numpy hidden. Both
are compared with a word-by-word RFC 1071 sum written independently here.
"""

import importlib
import os
import random
import struct
import sys

import pytest

import arcbox_net.wire.checksum as checksum_module


def reference_sum(data, initial=0):
    """RFC 1071 the slow way: big-endian 16-bit words (odd length padded with a
    zero byte), end-around carry after each addition."""
    data = bytes(data)
    if len(data) & 1:
        data += b"\0"
    total = initial
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@pytest.fixture(params=["numpy", "pure"])
def checksum(request):
    """The checksum module, with numpy or reloaded as if numpy were missing;
    the module (whose functions other modules hold) is restored afterwards."""
    mod = checksum_module
    if request.param == "numpy":
        if mod._np is None:
            if os.environ.get("CI") == "true":
                pytest.fail("numpy is missing: scripts/setup.sh installs .[test,fast]")
            pytest.skip("numpy (arcbox-net[fast]) is not installed")
        yield mod
        return
    saved = sys.modules.get("numpy", None)
    had = "numpy" in sys.modules
    sys.modules["numpy"] = None  # makes `import numpy` raise ImportError
    try:
        importlib.reload(mod)
        assert mod._np is None

        def no_numpy(data):
            raise AssertionError("the pure path called the numpy sum")
        mod._numpy_sum = no_numpy
        yield mod
    finally:
        if had:
            sys.modules["numpy"] = saved
        else:
            del sys.modules["numpy"]
        importlib.reload(mod)


def buffers():
    """Every length up to 300, the lengths around the numpy threshold and the
    segment sizes the stack sums, then random lengths up to 70000; random
    bytes, plus buffers whose sum is a multiple of 0xFFFF and all-zero ones."""
    rng = random.Random(1071)
    threshold = checksum_module._NUMPY_FROM
    lengths = [*range(301), threshold - 1, threshold, threshold + 1, threshold + 2,
               threshold + 3, 1460, 1480, 8192, 9000, 65495, 65535, 65536]
    lengths += [rng.randrange(threshold, 70000) for _ in range(60)]
    lengths += [rng.randrange(301, threshold) for _ in range(60)]
    for n in lengths:
        yield rng.randbytes(n)
    for n in (2, 3, 4097, 4098, 65536):
        yield b"\xff" * n           # one's-complement negative zero words
        yield b"\0" * n
    yield b"\x12\x34\xed\xcb" * 2000  # each pair of words sums to 0xFFFF


def test_ones_sum_matches_the_reference(checksum):
    mismatches = []
    for data in buffers():
        want = reference_sum(data)
        got = checksum.ones_sum(data)
        if got != want:
            mismatches.append((len(data), hex(got), hex(want)))
    assert not mismatches, mismatches[:10]


def test_the_numpy_threshold_is_crossed_on_the_numpy_run_only(checksum, monkeypatch):
    """The numpy run really sums big buffers with numpy (and the pure run,
    whose _numpy_sum raises, never does)."""
    calls = []
    if checksum._np is not None:
        real = checksum._numpy_sum
        monkeypatch.setattr(checksum, "_numpy_sum", lambda data: calls.append(len(data)) or real(data))
    data = random.Random(7).randbytes(65536)
    assert checksum.ones_sum(data) == reference_sum(data)
    assert checksum.ones_sum(data[:4096]) == reference_sum(data[:4096])
    assert calls == ([65536] if checksum._np is not None else [])


def test_initial_partial_sums_and_views(checksum):
    """A partial sum carried in, and the buffer types the stack passes
    (bytes, bytearray, memoryview slices at odd offsets)."""
    rng = random.Random(791)
    for _ in range(200):
        n = rng.choice([rng.randrange(0, 64), rng.randrange(64, 4200), rng.randrange(4200, 66000)])
        raw = bytearray(rng.randbytes(n + 3))
        start = rng.randrange(0, 4)
        view = memoryview(raw)[start:start + n]
        initial = rng.choice([0, 1, 0xFFFF, 0x1FFFE, rng.randrange(0, 1 << 20)])
        want = reference_sum(view, initial)
        assert checksum.ones_sum(view, initial) == want, (n, start, initial)
        assert checksum.ones_sum(bytes(view), initial) == want
        assert checksum.checksum(bytearray(view), initial) == ~want & 0xFFFF


def test_checksummed_data_verifies(checksum):
    """Data with its checksum field filled in sums to 0xFFFF, as a receiver checks."""
    rng = random.Random(1624)
    for n in (20, 21, 1500, 4095, 4097, 9001, 65515):
        body = bytearray(rng.randbytes(n))
        body[10:12] = b"\0\0"
        body[10:12] = struct.pack("!H", checksum.checksum(body))
        assert reference_sum(body) == 0xFFFF
        assert checksum.ones_sum(body) == 0xFFFF


def test_even_chunks_add_up(checksum):
    """Partial sums of even-length chunks, added and folded, equal the whole sum
    (how the TCP checksum joins the pseudo-header, header and payload)."""
    rng = random.Random(1141)
    for _ in range(50):
        data = rng.randbytes(rng.randrange(0, 20000))
        cut = rng.randrange(0, len(data) + 1) & ~1
        total = checksum.ones_sum(data[:cut]) + checksum.ones_sum(data[cut:])
        assert checksum.fold(total) == checksum.ones_sum(data) == reference_sum(data)


def test_pseudo_header_sum(checksum):
    src, dst = bytes([10, 0, 2, 2]), bytes([127, 0, 0, 1])
    for length in (0, 20, 1480, 65515):
        want = reference_sum(src + dst + struct.pack("!HH", 6, length))
        assert checksum.pseudo_header_sum(src, dst, 6, length) == want
