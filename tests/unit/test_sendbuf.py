"""SendBuffer against a plain bytearray model, with random operations."""

import random

from arcbox_net.tcp.sendbuf import SendBuffer


def test_random_operations_match_a_bytearray():
    rng = random.Random(42)
    for _ in range(200):
        buf, model = SendBuffer(), bytearray()
        for _ in range(60):
            op = rng.random()
            if op < 0.45:
                n = rng.choice([1, 7, 100, 5000, 20000, 70000, 262144])
                data = rng.randbytes(n)
                buf.append(data if rng.random() < 0.7 else memoryview(data))
                model += data
            elif op < 0.7 and model:
                n = rng.randint(0, len(model))
                buf.consume(n)
                del model[:n]
            elif op < 0.72:
                buf.clear()
                model.clear()
            else:
                a = rng.randint(0, len(model) + 10)
                b = rng.randint(a, len(model) + 100)
                assert bytes(buf.slice(a, b)) == bytes(model[a:b])
            assert len(buf) == len(model) and bool(buf) == bool(model)


def test_a_segment_within_one_large_chunk_is_not_copied():
    buf = SendBuffer()
    chunk = bytes(range(256)) * 1024
    buf.append(chunk)
    view = buf.slice(1000, 60000)
    assert isinstance(view, memoryview) and view.obj is chunk
    buf.consume(500)
    assert bytes(buf.slice(0, 10)) == chunk[500:510]
