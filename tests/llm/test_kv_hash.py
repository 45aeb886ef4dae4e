"""kvflow.llm.kv_hash: the block-hash test vector every engine and router must agree on."""

from __future__ import annotations

import xxhash

from kvflow.llm.kv_hash import (
    HASH_SEED,
    chain_hash,
    extra_seed,
    local_block_hash,
    local_block_hashes,
    sequence_hashes,
)


def test_vector() -> None:
    assert local_block_hash([1, 2, 3, 4]) == 14643705804678351452
    assert sequence_hashes([1, 2, 3, 4], 4) == [14643705804678351452]


def test_local_hash_is_xxh3_over_le_u32() -> None:
    data = b"".join(t.to_bytes(4, "little") for t in [1, 2, 3, 4])
    assert local_block_hash([1, 2, 3, 4]) == xxhash.xxh3_64_intdigest(data, seed=HASH_SEED)


def test_chaining() -> None:
    tokens = list(range(1, 13))
    first, second, third = (local_block_hash(tokens[i : i + 4]) for i in (0, 4, 8))
    expected = [first, chain_hash(first, second)]
    expected.append(chain_hash(expected[1], third))
    assert sequence_hashes(tokens, 4) == expected
    assert chain_hash(None, second) == second
    # The same block after a different prefix names a different sequence.
    assert sequence_hashes([9, 9, 9, 9, *tokens[4:8]], 4)[1] != expected[1]


def test_only_full_blocks() -> None:
    assert sequence_hashes([1, 2, 3], 4) == []
    assert sequence_hashes([1, 2, 3, 4, 5, 6], 4) == [14643705804678351452]
    assert local_block_hashes(list(range(10)), 4) == [
        local_block_hash(range(4)), local_block_hash(range(4, 8))]


def test_lora_and_multimodal_seed_change_hashes() -> None:
    tokens = list(range(8))
    plain = sequence_hashes(tokens, 4)
    lora = sequence_hashes(tokens, 4, lora_name="adapter-a")
    assert extra_seed() is None
    assert lora[0] != plain[0] and lora[1] != plain[1]
    assert lora != sequence_hashes(tokens, 4, lora_name="adapter-b")
    assert sequence_hashes(tokens, 4, mm_hashes=[123]) not in (plain, lora)
    assert lora == sequence_hashes(tokens, 4, lora_name="adapter-a")


def test_cache_salt_separates_every_block_and_leaves_unsalted_hashes_alone() -> None:
    tokens = list(range(1, 13))
    plain = sequence_hashes(tokens, 4)
    assert sequence_hashes(tokens, 4, salt=None) == sequence_hashes(tokens, 4, salt="") == plain
    a, b = sequence_hashes(tokens, 4, salt="tenant-a"), sequence_hashes(tokens, 4, salt="tenant-b")
    assert not {*a} & {*b} and not {*a} & {*plain}
    assert sequence_hashes(tokens, 4, salt="tenant-a") == a  # stable
    assert sequence_hashes(tokens, 4, lora_name="x", salt="tenant-a") != a
    assert extra_seed(salt="ab") != extra_seed(lora_name="ab")
