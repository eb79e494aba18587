"""The rollout engine's per-request uniforms: fetched in blocks, they are the generator's one-at-a-time draws."""

import torch

from zaya_train.rollout.sampling import UniformStream, draw_uniforms, request_generator


def test_a_stream_gives_the_generators_draws_one_at_a_time_across_blocks():
    count = 2 * UniformStream.BLOCK + 5
    one_at_a_time = torch.Generator().manual_seed(7)
    expected = [float(torch.rand(1, generator=one_at_a_time, dtype=torch.float64)) for _ in range(count)]
    stream = UniformStream(torch.Generator().manual_seed(7))
    assert [stream.next() for _ in range(count)] == expected


def test_draw_uniforms_takes_the_next_value_of_each_stream_in_order():
    streams = [UniformStream(request_generator(seed=3, index=i)) for i in range(3)]
    first, second = draw_uniforms(streams), draw_uniforms(streams[1:])
    reference = [torch.rand(2, generator=request_generator(seed=3, index=i), dtype=torch.float64) for i in range(3)]
    assert first.dtype == torch.float64
    assert torch.equal(first, torch.stack([r[0] for r in reference]))
    assert torch.equal(second, torch.stack([r[1] for r in reference[1:]]))
