"""BatchingEncoders' failure path, strictly: a request whose input the encoders cannot encode
fails with the encoders' own exception, and the requests that shared its batch get exactly the
vectors they would have got encoded alone."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from prodsearch.encoders import EncoderInput, EncoderSet, SparseVec, Vector
from prodsearch.serving import BatchingEncoders

TITLES = [
    f"{brand} {item} {size}"
    for brand in ("Oatly", "Arla", "Tropicana")
    for item in ("oat milk", "apple juice", "yoghurt")
    for size in ("1L", "250 ml")
]
GOOD = [
    [EncoderInput(title=TITLES[0])],
    [EncoderInput(title=TITLES[5]), EncoderInput(title=TITLES[9])],
    [EncoderInput(image=Image.new("RGB", (80, 60), "orange"))],
    [EncoderInput(title=TITLES[12], phash="94974f937d4c2433")],
]
BAD = [EncoderInput(title="broken", image="not an image")]  # type: ignore[arg-type]


def _assert_equal(got: dict[str, Vector], alone: dict[str, Vector]) -> None:
    assert set(got) == set(alone)
    for name, vector in alone.items():
        if isinstance(vector, SparseVec):
            np.testing.assert_array_equal(got[name].indices, vector.indices)  # type: ignore[union-attr]
            np.testing.assert_allclose(got[name].values, vector.values, atol=1e-6)  # type: ignore[union-attr]
        else:
            np.testing.assert_allclose(got[name], vector, atol=1e-6, err_msg=name)


def test_a_bad_request_fails_with_its_own_error_and_the_others_get_their_vectors(
    encoders: EncoderSet,
) -> None:
    alone = [encoders.encode(items) for items in GOOD]
    with pytest.raises(Exception) as raised_alone:  # its exact type is checked below
        encoders.encode(BAD)
    expected = raised_alone.value
    assert type(expected) is not Exception

    batching = BatchingEncoders(encoders, max_batch=64)
    try:
        with ThreadPoolExecutor(len(GOOD) + 2) as pool:
            # A long first job keeps the worker busy while the others queue up: they are taken
            # as one batch, which the bad input fails, and each is then encoded alone.
            busy = pool.submit(batching.encode, [EncoderInput(title=t) for t in TITLES * 100])
            good = [pool.submit(batching.encode, items) for items in GOOD]
            failing = pool.submit(batching.encode, BAD)
            deadline = time.monotonic() + 30
            while batching._jobs.qsize() < len(GOOD) + 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert not busy.done(), "the others were queued while the worker was busy"
            assert len(busy.result()) == len(TITLES) * 100
            with pytest.raises(type(expected)) as raised:
                failing.result()
            assert str(raised.value) == str(expected)
            for future, vectors in zip(good, alone, strict=True):
                got = future.result()
                assert len(got) == len(vectors)
                for one, reference in zip(got, vectors, strict=True):
                    _assert_equal(one, reference)
    finally:
        batching.close()
