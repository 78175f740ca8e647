"""Latent encoding (kindjax.tools.encode) and the sharded, per-process, prefetching latent loader (kindjax.data.latents)."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest

from kindjax.config import ConfigError, base_config
from kindjax.data.latents import NOISE_STREAM, LatentDataset, open_latents, read_index, repair_command
from kindjax.data.pipeline import DeviceBatches, batch_indices, flip_draws, note_process_count, stream_indices
from kindjax.tools.encode import encode_shards, stored_moments, write_index
from kindjax.sharding import batch_sharding, make_mesh
from kindjax.models.vae import AutoencoderKL, PretrainedVAE

UNREADABLE = (4, 11, 12)
SHARD, BATCH, SCALE = 5, 8, 0.5


class TinySource:
    """23 random 8×8 RGB images of 3 classes; three of them unreadable."""

    num_classes = 3
    class_names = ("ant", "bee", "cat")

    def __init__(self):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (23, 8, 8, 3), dtype=np.uint8)
        self.labels = rng.integers(0, 3, 23)

    def __len__(self):
        return 23

    def label(self, index):
        return int(self.labels[index])

    def image(self, index):
        return None if index in UNREADABLE else self.images[index]


def tiny_vae():
    """A tiny AutoencoderKL with random parameters (NumPy: compiling ``model.init`` takes long on CPU)."""
    model = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))["params"]
    rng = np.random.default_rng(3)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return (rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
        return ((name == "scale") + 0.1 * rng.normal(size=shape)).astype(np.float32)

    return PretrainedVAE(model=model, params=jax.tree_util.tree_map_with_path(draw, shapes), scaling_factor=0.13,
                         config={"block_out_channels": [8, 16]}, path="tiny")


def encode_into(out, **kw):
    kw = dict(shard_size=SHARD, batch_size=BATCH, flips=True, source_info={"name": "tiny"}, log=lambda s: None) | kw
    return encode_shards(TinySource(), tiny_vae(), str(out), **kw)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """float32 moments (the encode of earlier kindjax versions)."""
    out = tmp_path_factory.mktemp("latents")
    encode_into(out, dtype="float32")
    return str(out), write_index(str(out))


@pytest.fixture(scope="module")
def encoded16(tmp_path_factory):
    """The default: float16 moments."""
    out = tmp_path_factory.mktemp("latents16")
    encode_into(out)
    return str(out), write_index(str(out))


def latent_config(root, **data):
    c = base_config()
    c.data.update(name="latents", root=root, **data)
    c.model.update(image_size=4, in_channels=4, num_classes=len(data.get("classes", ())) or 3)
    c.vae.scale = SCALE
    return c


def stored(root):
    """All moments (as float32) and labels of a latent directory, concatenated (shards in order)."""
    index = read_index(root)
    names = [s["name"] for s in index["shards"]]
    dtype = {"bfloat16": ml_dtypes.bfloat16}.get(index.get("dtype"), None)

    def load(name):
        array = np.load(os.path.join(root, f"{name}.moments.npy"))
        return (array.view(dtype) if dtype else array).astype(np.float32).reshape((-1, 2, 2, 4, 4, 4))

    moments = np.concatenate([load(n) for n in names])
    labels = np.concatenate([np.load(os.path.join(root, f"{n}.labels.npy")) for n in names])
    return moments, labels


def reference_image(moments, step, seed, rows, idx, views):
    """Independent oracle of the batch formula: float64 ``scale·(mean_v + std_v·ε_r)`` with the
    documented key ``fold_in(fold_in(fold_in(key(seed), NOISE_STREAM), step), r)``."""
    out = []
    for r, i, v in zip(rows, idx, views):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), NOISE_STREAM), step), r)
        eps = np.asarray(jax.random.normal(key, (4, 4, 4), np.float32), np.float64)
        out.append(SCALE * (moments[i, v, 0].astype(np.float64) + moments[i, v, 1].astype(np.float64) * eps))
    return np.stack(out)


def test_encode_matches_the_vae_and_indexes_skips(encoded, encoded16):
    root, index = encoded
    source, vae = TinySource(), tiny_vae()
    kept = [i for i in range(23) if i not in UNREADABLE]
    assert index["num_examples"] == 20 and index["latent_shape"] == [4, 4, 4] and index["views"] == 2
    assert index["skipped"] == {"count": 3, "indices": list(UNREADABLE)}
    assert [s["count"] for s in index["shards"]] == [4, 5, 3, 5, 3]
    assert all(s["finite"] for s in index["shards"]) and index["dtype"] == "float32"
    assert index["class_names"] == list(source.class_names) and index["scale"] == 0.13
    assert index["image_shape"] == [8, 8, 3] and index["source"] == {"name": "tiny"}
    moments, labels = stored(root)
    np.testing.assert_array_equal(labels, source.labels[kept])
    x = source.images[kept].astype(np.float32) / 127.5 - 1
    for view, images in enumerate((x, x[:, :, ::-1])):
        mean, logvar = vae.model.apply({"params": vae.params}, images, method=AutoencoderKL.encode)
        np.testing.assert_allclose(moments[:, view, 0], mean, atol=1e-5)
        np.testing.assert_allclose(moments[:, view, 1], np.exp(0.5 * np.asarray(logvar)), rtol=1e-5)
    assert not np.allclose(moments[:, 0], moments[:, 1])
    # the default stores float16: the float32 moments rounded once, half the bytes
    root16, index16 = encoded16
    assert index16["dtype"] == "float16"
    assert np.load(os.path.join(root16, "shard_00000.moments.npy")).dtype == np.float16
    np.testing.assert_array_equal(stored(root16)[0], moments.astype(np.float16).astype(np.float32))
    size = lambda r: os.path.getsize(os.path.join(r, "shard_00001.moments.npy")) - 128   # noqa: E731
    assert size(root16) * 2 == size(root)
    with pytest.raises(ConfigError, match="--dtype='float8'"):
        encode_into(root16, dtype="float8")


def test_encode_resumes_repairs_and_splits_shards_over_processes(encoded, tmp_path):
    root, index = encoded
    out = tmp_path / "split"
    assert encode_into(out, process_index=0, process_count=2, dtype="float32") == [0, 2, 4]
    with pytest.raises(ConfigError, match="shard 1 of .* not finished"):
        write_index(str(out))
    assert encode_into(out, process_index=1, process_count=2, dtype="float32") == [1, 3]
    # a killed encode: shard 2's marker never written, a temporary file left behind
    os.remove(out / "shard_00002.json")
    (out / "shard_00002.moments.npy.tmp").write_bytes(b"partial")
    assert encode_into(out, dtype="float32") == [2]
    assert encode_into(out, dtype="float32") == []
    again = write_index(str(out))
    assert again == index | {"vae": again["vae"]}
    # damaged shards with their JSON present: a truncated moments file, a deleted labels file, a
    # moments file of another shape; the index is refused until the encode repairs them
    moments_file = out / "shard_00001.moments.npy"
    moments_file.write_bytes(moments_file.read_bytes()[:-100])
    os.remove(out / "shard_00003.labels.npy")
    np.save(out / "shard_00004.moments.npy", np.zeros((3, 2, 2, 4, 4, 2), np.float32))
    with pytest.raises(ConfigError, match="shard 1 of .* damaged"):
        write_index(str(out))
    assert encode_into(out, dtype="float32") == [1, 3, 4]
    assert write_index(str(out)) == again
    for got, want in zip(stored(str(out)), stored(root)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ConfigError, match="shard_size"):
        encode_into(out, shard_size=6, dtype="float32")
    with pytest.raises(ConfigError, match="dtype differ"):
        encode_into(out)


def test_order_is_a_pure_function_of_seed_and_step_whatever_the_process_count():
    n, batch, streams = 48, 8, 4                        # 4 parts of 12 examples, 2 rows each: 6 steps an epoch
    first = [batch_indices(n, s, batch, 3, streams) for s in range(12)]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(
        [batch_indices(n, s, batch, 3, streams) for s in range(12)]))   # reproducible (and from the cache)
    assert not np.array_equal(first[0], batch_indices(n, 0, batch, 4, streams))
    for processes in (1, 2, 4, 8):                      # processes' rows: disjoint, together the global batch
        for s in (0, 5, 7):
            rows = [batch_indices(n, s, batch, 3, streams, p * batch // processes, (p + 1) * batch // processes)
                    for p in range(processes)]
            np.testing.assert_array_equal(np.concatenate(rows), first[s])
    for epoch in (0, 1):                                # every example once per epoch
        seen = np.concatenate(first[6 * epoch:6 * epoch + 6])
        np.testing.assert_array_equal(np.sort(seen), np.arange(n))
    # stream g of G draws only from its part [g·n/G, (g+1)·n/G): a process reads only its part
    for g in range(streams):
        assert set(np.concatenate([f[2 * g:2 * g + 2] for f in first]).tolist()) == set(range(12 * g, 12 * g + 12))
    # one stream is today's global order; its epochs are cached, and a cached permutation is read-only
    for s in (0, 5, 6, 11):
        np.testing.assert_array_equal(batch_indices(50, s, batch, 3), np.concatenate(
            [np.random.default_rng((3, e)).permutation(50) for e in range(3)])[s * batch:(s + 1) * batch])
    assert not stream_indices(50, 0, batch, 3).flags.writeable
    np.testing.assert_array_equal(flip_draws(4, batch, 3), np.random.default_rng((3, 4, 1)).random(batch) < 0.5)


def test_batch_is_recomputed_from_the_files(encoded):
    root, _ = encoded
    moments, labels = stored(root)
    dataset = open_latents(latent_config(root))
    assert len(dataset) == 20 and dataset.num_classes == 3 and dataset.streams_for(BATCH) == 8
    views = set()
    for step, seed in ((0, 0), (2, 5), (7, 5)):   # step 2 crosses an epoch boundary of some streams
        batch = dataset.batch(step, BATCH, seed)
        idx = batch_indices(20, step, BATCH, seed, 8)
        view = flip_draws(step, BATCH, seed).astype(int)
        np.testing.assert_array_equal(batch["label"], labels[idx])
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        views |= set(view.tolist())
        np.testing.assert_allclose(batch["image"], reference_image(moments, step, seed, range(BATCH), idx, view),
                                   rtol=1e-6, atol=1e-6)
    assert views == {0, 1}
    c = latent_config(root)
    c.data.update(random_flip=False, streams=2)
    unflipped = open_latents(c).batch(2, BATCH, 5)
    idx = batch_indices(20, 2, BATCH, 5, 2)
    np.testing.assert_allclose(unflipped["image"], reference_image(moments, 2, 5, range(BATCH), idx, [0] * BATCH),
                               rtol=1e-6, atol=1e-6)
    c.data.streams = 3
    with pytest.raises(ConfigError, match="data.streams=3 does not fit batch_size=8"):
        open_latents(c).batch(0, BATCH, 0)


def test_processes_read_only_their_shards_and_cover_the_epoch(encoded):
    root, _ = encoded
    run = open_latents(latent_config(root))
    whole = [run.batch(s, BATCH, 1) for s in range(6)]
    for processes in (2, 4):
        parts = []
        for p in range(processes):
            dataset = open_latents(latent_config(root), log=lambda s: None)
            reads = dataset.shards_read(BATCH, p, processes)
            local = [dataset.local_batch(s, BATCH, 1, p, processes) for s in range(6)]
            assert sorted(dataset.opened_shards) == sorted(set(dataset.opened_shards) & set(reads))
            parts.append((set(reads), local))
        for s in range(6):
            for k in ("image", "label"):
                np.testing.assert_array_equal(np.concatenate([local[s][k] for _, local in parts]), whole[s][k])
        assert len(set.union(*[r for r, _ in parts])) == 5
        if processes == 2:   # streams 0–3 hold examples 0–9 (shards 0–2), streams 4–7 examples 10–19 (2–4)
            assert [sorted(r) for r, _ in parts] == [[0, 1, 2], [2, 3, 4]]


def test_compact_latents_give_the_same_batches(encoded, encoded16, tmp_path):
    root, index = encoded
    bf16 = tmp_path / "bf16"                       # a bfloat16 directory made from the float32 one
    shutil.copytree(root, bf16)
    for s in index["shards"]:
        path = bf16 / f"{s['name']}.moments.npy"
        np.save(path, stored_moments(np.load(path), "bfloat16"))
    (bf16 / "index.json").write_text(json.dumps(index | {"dtype": "bfloat16"}))
    want = open_latents(latent_config(root)).batch(3, BATCH, 2)
    for path, rtol in ((encoded16[0], 2 ** -10), (str(bf16), 2 ** -7)):
        got = open_latents(latent_config(path)).batch(3, BATCH, 2)
        np.testing.assert_array_equal(got["label"], want["label"])
        scale = np.abs(want["image"]).max()
        np.testing.assert_allclose(got["image"], want["image"], rtol=0, atol=2 * rtol * scale)
        assert not np.array_equal(got["image"], want["image"])


def test_old_float32_directories_still_load(encoded, tmp_path):
    root, index = encoded
    old = tmp_path / "old"
    shutil.copytree(root, old)
    (old / "index.json").write_text(json.dumps(
        {k: v for k, v in index.items() if k != "dtype"} | {"shards": [
            {"name": s["name"], "count": s["count"]} for s in index["shards"]]}))
    for name in os.listdir(old):
        if name.startswith("shard_") and name.endswith(".json"):
            info = json.loads((old / name).read_text())
            (old / name).write_text(json.dumps({k: v for k, v in info.items() if k not in ("dtype", "finite")}))
    os.remove(old / "encode.json")
    got, want = open_latents(latent_config(str(old))).batch(1, BATCH, 0), open_latents(latent_config(root)).batch(
        1, BATCH, 0)
    for k in ("image", "label"):
        np.testing.assert_array_equal(got[k], want[k])


def test_device_prefetch_and_workers_give_the_same_batches(encoded):
    root, _ = encoded
    dataset = open_latents(latent_config(root), log=lambda s: None)
    run = [dataset.batch(s, BATCH, 1) for s in range(7)]
    mesh = make_mesh(devices=jax.devices()[:8])
    sharding = batch_sharding(mesh)

    def place(local):
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}

    for depth, workers in ((0, 1), (2, 1), (3, 2)):
        with DeviceBatches(dataset.batches(2, BATCH, 1, workers=workers), place, depth) as batches:
            for s in range(2, 7):
                step, batch = next(batches)
                assert step == s and batch["image"].sharding.is_equivalent_to(sharding, 4)
                np.testing.assert_array_equal(np.asarray(batch["label"]), run[s]["label"])
                np.testing.assert_allclose(np.asarray(batch["image"]), run[s]["image"], rtol=1e-6, atol=1e-7)
    with dataset.batches(5, BATCH, 1, process_index=1, process_count=2, depth=3) as batches:
        step, local = next(batches)
        assert step == 5 and local["moments"].dtype == np.float32 and local["noise"].shape == (BATCH // 2, 3)
        np.testing.assert_array_equal(np.asarray(batches.finish(local)["image"]), run[5]["image"][BATCH // 2:])
    with pytest.raises(ValueError, match="split evenly over 3 processes"):
        dataset.batches(0, BATCH, 1, process_index=0, process_count=3)


RESUMABLE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_latents import latent_config
    from kindjax.data.latents import open_latents
    root, out, start, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with open_latents(latent_config(root)).batches(start, 8, 1, workers=2) as batches:
        for step, local in batches:
            np.save(os.path.join(out, f"{{step}}.npy"), np.asarray(batches.finish(local)["image"]))
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if step == 9:
                break
""")


@pytest.mark.slow  # 12 s (-n 2, 2 cores)
def test_resume_after_sigkill_gives_identical_batches(encoded, tmp_path, single_device_env):
    root, _ = encoded
    script = tmp_path / "resumable.py"
    script.write_text(RESUMABLE.format(tests=os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "batches"
    out.mkdir()
    killed = subprocess.run([sys.executable, str(script), root, str(out), "0", "4"], env=single_device_env,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = sorted(int(f[:-4]) for f in os.listdir(out))
    assert done == [0, 1, 2, 3, 4]
    resumed = subprocess.run([sys.executable, str(script), root, str(out), str(done[-1] + 1), "-1"],
                             env=single_device_env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    dataset = open_latents(latent_config(root))
    for s in range(10):
        np.testing.assert_array_equal(np.load(out / f"{s}.npy"), dataset.batch(s, BATCH, 1)["image"])


def test_a_resume_on_another_process_count_says_what_changed(tmp_path):
    workdir = str(tmp_path / "run")
    assert note_process_count(workdir, 2, write=True) is None
    assert note_process_count(workdir, 2, write=True) is None
    note = note_process_count(workdir, 4, write=True)
    assert "resumed on 4 processes, the run before used 2" in note and "continue unchanged" in note
    assert "\n" not in note and note_process_count(workdir, 4, write=False) is None


def one_line_error(config, match):
    with pytest.raises(ConfigError, match=match) as error:
        open_latents(config)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_bad_shards_are_named_at_start_up_or_skipped(encoded, tmp_path):
    root, index = encoded
    for damage, problem in (
            (lambda d: os.remove(d / "shard_00003.moments.npy"), "shard_00003.moments.npy is missing"),
            (lambda d: (d / "shard_00003.moments.npy").write_bytes((d / "shard_00003.moments.npy").read_bytes()[:-64]),
             r"shard_00003.moments.npy is truncated \(\d+ of \d+ bytes\)"),
            (lambda d: np.save(d / "shard_00003.moments.npy", np.zeros((5, 2, 2, 4, 4, 2), np.float32)),
             r"shard_00003.moments.npy holds float32 \(5, 2, 2, 4, 4, 2\), expected float32 \(5, 2, 2, 4, 4, 4\)"),
            (lambda d: np.save(d / "shard_00003.labels.npy", np.zeros(5, np.int64)), "shard_00003.labels.npy holds int64")):
        copy = tmp_path / f"copy{len(os.listdir(tmp_path))}"
        shutil.copytree(root, copy)
        damage(copy)
        one_line_error(latent_config(str(copy)), f"latent shard .*{problem}.*; rerun .* to re-encode it, or set "
                                                 f"data.bad_shards=skip")
        skipping = open_latents(latent_config(str(copy), bad_shards="skip"), log=lambda s: None)
        assert skipping.skipped_shards == ["shard_00003"] and len(skipping) == 15
        assert skipping.batch(0, BATCH, 0)["image"].shape == (BATCH, 4, 4, 4)
    # an index that does not match its shards is refused
    copy = tmp_path / "index"
    shutil.copytree(root, copy)
    shards = [dict(s) for s in index["shards"]]
    shards[1]["count"], shards[2]["count"] = 4, 4
    (copy / "index.json").write_text(json.dumps(index | {"shards": shards}))
    one_line_error(latent_config(str(copy)), r"index.json does not match its shards: shard_00001 holds 5 "
                                             r"examples, the index says 4; rerun .* to rewrite the index")


def test_nan_latents_are_refused_naming_the_shard(encoded, tmp_path):
    vae = tiny_vae()
    for leaf in jax.tree_util.tree_leaves(vae.params):   # a VAE that gives NaN: the encode records it
        leaf[...] = np.nan
    out = tmp_path / "nan"
    encode_shards(TinySource(), vae, str(out), shard_size=SHARD, batch_size=BATCH, flips=True,
                  source_info={"name": "tiny"}, log=lambda s: None)
    assert not any(s["finite"] for s in write_index(str(out))["shards"])
    one_line_error(latent_config(str(out)), r"shard_00000.moments.npy holds NaN or Inf moments \(found when it "
                                            r"was encoded")
    # NaN written into a shard after the encode: found by the full scan of this process's shards
    root, _ = encoded
    copy = tmp_path / "later"
    shutil.copytree(root, copy)
    moments = np.load(copy / "shard_00004.moments.npy", mmap_mode="r+")
    moments[1, 0, 1, 2] = np.inf
    moments.flush()
    del moments
    dataset = open_latents(latent_config(str(copy), verify_latents="full"), log=lambda s: None)
    dataset.batches(0, BATCH, 0, process_index=0, process_count=2).close()   # process 0 never reads shard 4
    with pytest.raises(ConfigError, match="shard_00004.moments.npy holds NaN or Inf"):
        dataset.batches(0, BATCH, 0, process_index=1, process_count=2)
    with pytest.raises(ConfigError, match="shard_00004.moments.npy holds NaN or Inf") as error:
        dataset.batches(0, BATCH, 0)
    # The repair it names re-encodes exactly that shard (its files check out, so only --redo finds it).
    assert "--redo=4 to re-encode it" in str(error.value)
    assert encode_into(copy, dtype="float32", redo=[4]) == [4]
    write_index(str(copy))
    repaired = open_latents(latent_config(str(copy), verify_latents="full"), log=lambda s: None)
    repaired.batches(0, BATCH, 0).close()
    np.testing.assert_array_equal(stored(str(copy))[0], stored(root)[0])


def test_a_label_outside_the_classes_is_named_and_repaired(encoded, tmp_path):
    """A label no class of the index has (written into a shard after its encode) is named at start-up
    with the repair, which re-encodes that shard; before, it was an IndexError (a bug?)."""
    root, _ = encoded
    copy = tmp_path / "labels"
    shutil.copytree(root, copy)
    labels = np.load(copy / "shard_00002.labels.npy")
    labels[1] = 7
    np.save(copy / "shard_00002.labels.npy", labels)
    message = one_line_error(latent_config(str(copy)), r"latent shard .*shard_00002.labels.npy holds 1 labels outside "
                                                      r"the 3 classes of the index \(e.g. 7\); rerun .*--redo=2 to "
                                                      r"re-encode it, or set data.bad_shards=skip")
    assert "IndexError" not in message
    skipping = open_latents(latent_config(str(copy), bad_shards="skip"), log=lambda s: None)
    assert skipping.skipped_shards == ["shard_00002"]
    assert encode_into(copy, dtype="float32") == [2]   # a plain rerun finds it too
    write_index(str(copy))
    np.testing.assert_array_equal(stored(str(copy))[1], stored(root)[1])
    assert len(open_latents(latent_config(str(copy)))) == 20


def test_the_repair_is_built_from_known_fields_only(encoded, tmp_path):
    """encode.json comes with the data: whatever it holds, the repair names kindjax.tools.encode on this
    directory, each recorded field one shell word, overrides only ``--config.*``, no recorded command."""
    root, _ = encoded
    copy = tmp_path / "hostile"
    shutil.copytree(root, copy)
    plan = json.loads((copy / "encode.json").read_text())
    plan.update(command="touch /tmp/owned", invocation={
        "cwd": "/x; touch /tmp/owned", "config": "c.py && touch /tmp/owned", "vae": "$(touch /tmp/owned)",
        "dtype": "float16`touch /tmp/owned`", "overrides": ["--config.data.root=/a b", "; touch /tmp/owned",
                                                              "--vae=/evil", 3]})
    (copy / "encode.json").write_text(json.dumps(plan))
    command = repair_command(str(copy), [1, 3])
    assert "/tmp/owned" not in command.replace(shlex.quote("/x; touch /tmp/owned"), "").replace(
        shlex.quote("c.py && touch /tmp/owned"), "").replace(shlex.quote("$(touch /tmp/owned)"), "").replace(
        shlex.quote("float16`touch /tmp/owned`"), "")
    assert shlex.split(command) == ["cd", "/x; touch /tmp/owned", "&&", "python", "-m", "kindjax.tools.encode",
                                    "--config", "c.py && touch /tmp/owned", "--vae", "$(touch /tmp/owned)",
                                    "--out", str(copy), "--dtype", "float16`touch /tmp/owned`",
                                    "--config.data.root=/a b", "--redo=1,3"]
    (copy / "encode.json").write_text("[1, 2]")
    assert shlex.split(repair_command(str(copy))) == ["python", "-m", "kindjax.tools.encode", "--config", "CONFIG",
                                                      "--vae", "VAE_DIR", "--out", str(copy)]


def test_class_selection(encoded):
    root, _ = encoded
    _, labels = stored(root)
    dataset = open_latents(latent_config(root, classes=(2, 0)))
    assert dataset.num_classes == 2 and dataset.class_names == ("cat", "ant")
    assert len(dataset) == int(np.sum((labels == 2) | (labels == 0)))
    full = open_latents(latent_config(root))
    batch = dataset.batch(1, BATCH, 0)
    assert set(batch["label"].tolist()) <= {0, 1}
    # the selected examples, in stored order, are the stream's examples
    np.testing.assert_array_equal(dataset.positions, np.flatnonzero((labels == 2) | (labels == 0)))
    np.testing.assert_array_equal(np.where(labels[dataset.positions] == 2, 0, 1), dataset.labels)
    assert len(full) == 20
    with pytest.raises(ConfigError, match=r"class ids \[3\] out of range"):
        open_latents(latent_config(root, classes=(0, 3)))
    c = latent_config(root)
    c.model.num_classes = 5
    with pytest.raises(ConfigError, match="model.num_classes=3"):
        open_latents(c)
    c = latent_config(root)
    c.model.image_size = 8
    with pytest.raises(ConfigError, match="model.image_size=4"):
        open_latents(c)


def test_missing_or_corrupt_latents_are_clear_errors(encoded, tmp_path):
    root, _ = encoded
    with pytest.raises(ConfigError, match="needs data.root"):
        open_latents(latent_config(""))
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    index_path = copy / "index.json"
    index = json.loads(index_path.read_text())
    os.remove(index_path)
    with pytest.raises(ConfigError, match="encode the images first"):
        open_latents(latent_config(str(copy)))
    index_path.write_text('{"format": 1, "shards": [')
    with pytest.raises(ConfigError, match="corrupt"):
        open_latents(latent_config(str(copy)))
    index_path.write_text(json.dumps(index | {"num_examples": 21}))
    with pytest.raises(ConfigError, match="corrupt.*num_examples"):
        open_latents(latent_config(str(copy)))
    index_path.write_text(json.dumps(index))
    assert len(open_latents(latent_config(str(copy)))) == 20
    with pytest.raises(ConfigError, match="data.random_flip=False"):
        LatentDataset(root, read_index(root) | {"views": 1}, random_flip=True)
    with pytest.raises(ValueError, match="batch_size > 0"):
        LatentDataset(root, read_index(root), classes=()).batch(0, 0, 0)


@pytest.mark.slow  # 34 s (-n 2, 2 cores)
def test_command_encodes_a_folder_with_a_diffusers_vae(tmp_path, single_device_env):
    """``python -m kindjax.tools.encode`` end to end: a folder of PNGs, a tiny diffusers VAE directory."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image

    torch.manual_seed(0)
    vae_dir = str(tmp_path / "vae")
    diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4).save_pretrained(
        vae_dir, safe_serialization=True)
    rng = np.random.default_rng(0)
    for name, count in (("cat", 3), ("dog", 4)):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / "images" / name / f"{i}.png")
    (tmp_path / "images" / "dog" / "broken.png").write_bytes(b"not a png")
    out = str(tmp_path / "latents")
    command = [sys.executable, "-m", "kindjax.tools.encode", "--config", "configs/dit_digits.py", "--out", out,
               "--config.data.name=folder", f"--config.data.root={tmp_path / 'images'}",
               "--config.data.image_size=16", "--config.data.classes=(1,)",
               "--config.vae.encode_batch_size=2", "--config.vae.shard_size=3"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    failed = subprocess.run(command, cwd=root, env=single_device_env, capture_output=True, text=True)
    assert failed.returncode != 0 and "no VAE given" in failed.stderr
    done = subprocess.run(command + ["--vae", vae_dir], cwd=root, env=single_device_env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shard 3/3" in done.stdout
    index = read_index(out)
    assert index["num_examples"] == 7 and index["skipped"]["count"] == 1
    assert index["class_names"] == ["cat", "dog"] and index["latent_shape"] == [8, 8, 4]
    c = latent_config(out, classes=(1,))
    c.model.image_size = 8
    dataset = open_latents(c)
    assert len(dataset) == 4 and dataset.class_names == ("dog",)
    assert dataset.batch(0, 4, 0)["image"].shape == (4, 8, 8, 4)
    assert index["dtype"] == "float16"
    # a truncated shard is named with the command that wrote the directory; that command repairs it
    before = dataset.batch(1, 4, 0)
    shard = os.path.join(out, "shard_00001.moments.npy")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 10)
    message = one_line_error(c, "shard_00001.moments.npy is truncated")
    command = message.split("; rerun ", 1)[1].split(" to re-encode it", 1)[0]
    assert command.startswith(f"cd {shlex.quote(root)} && python -m kindjax.tools.encode --config configs/dit_digits.py")
    repaired = subprocess.run(["bash", "-c", command.replace("python", shlex.quote(sys.executable), 1)],
                              env=single_device_env, capture_output=True, text=True)
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    assert "1 shards (3 images) to encode" in repaired.stdout
    np.testing.assert_array_equal(open_latents(c).batch(1, 4, 0)["image"], before["image"])
    # NaN written into a shard after its encode (found by the full scan) and a label outside the classes:
    # each named with a command that re-encodes that shard and nothing else
    moments = np.load(os.path.join(out, "shard_00002.moments.npy"), mmap_mode="r+")
    moments[0, 0, 1, 0, 0, 0] = np.nan
    moments.flush()
    del moments
    labels = np.load(os.path.join(out, "shard_00000.labels.npy"))
    np.save(os.path.join(out, "shard_00000.labels.npy"), labels + 5)
    c.data.verify_latents = "full"
    for shard, problem in ((0, "shard_00000.labels.npy holds"), (2, "shard_00002.moments.npy holds NaN or Inf")):
        with pytest.raises(ConfigError, match=problem) as error:
            open_latents(c, log=lambda s: None).batches(0, 4, 0).close()
        fix = str(error.value).split("; rerun ", 1)[1].split(" to re-encode it", 1)[0]
        assert fix.endswith(f" --redo={shard}")
        repaired = subprocess.run(["bash", "-c", fix.replace("python", shlex.quote(sys.executable), 1)],
                                  env=single_device_env, capture_output=True, text=True)
        assert repaired.returncode == 0 and "1 shards (" in repaired.stdout, repaired.stderr[-3000:]
    open_latents(c, log=lambda s: None).batches(0, 4, 0).close()
    np.testing.assert_array_equal(open_latents(c).batch(1, 4, 0)["image"], before["image"])
    c.data.verify_latents = "sizes"
    dataset = open_latents(c)   # the repairs replaced the files the first one had mapped
    # The same config that encoded the folder trains on its latents once data.latents names them.
    from kindjax.data import make_dataset

    c.data.update(name="folder", root=str(tmp_path / "images"), latents=out)
    c.model.num_classes = 1
    trained_on = make_dataset(c)
    np.testing.assert_array_equal(trained_on.batch(3, 4, 1)["image"], dataset.batch(3, 4, 1)["image"])


@pytest.mark.slow
def test_compact_latents_train_like_float32(tmp_path):
    """The training loss on float16 moments equals float32's (the figures of docs/benchmarks.md)."""
    from conftest import tiny_config
    from kindjax.data.digits import load_digits
    from kindjax.train.trainer import train
    from test_trainer import tb_scalars

    digits = load_digits(())

    class Digits:
        num_classes, class_names = 10, tuple(str(i) for i in range(10))

        def __len__(self):
            return len(digits.images)

        def label(self, i):
            return int(digits.labels[i])

        def image(self, i):
            return np.repeat(np.round((digits.images[i] + 1) * 127.5).astype(np.uint8), 3, -1)

    losses = {}
    for dtype in ("float32", "float16"):
        root = str(tmp_path / dtype)
        encode_shards(Digits(), tiny_vae(), root, shard_size=512, batch_size=64, flips=True,
                      source_info={"name": "digits"}, dtype=dtype, log=lambda s: None)
        write_index(root)
        c = tiny_config()
        c.data.update(name="latents", root=root, classes=())
        c.model.update(image_size=4, in_channels=4, num_classes=10)
        c.train.update(num_steps=60, log_every=10, checkpoint_every=10_000, sample_every=100_000)
        c.vae.scale = 1.0
        train(c, str(tmp_path / f"run_{dtype}"))
        values = tb_scalars(str(tmp_path / f"run_{dtype}"))
        losses[dtype] = np.array([values[k] for k in sorted(values)])
    np.testing.assert_allclose(losses["float16"], losses["float32"], rtol=1e-4)
