"""Latent caching: encode a dataset once, then train from the latents (as MAR and fast-DiT do).

A cache directory holds::

    index.json                 settings (source, image size, autoencoder spec with its weights'
                               sha256, flip, dtype), the shard list, and ``complete``
    shard_00000.safetensors    ``mean`` [n, C, h, w] (scaled posterior means), ``std`` (their
                               standard deviations, for a VAE), ``mean_flip``/``std_flip`` (the
                               same for the horizontally flipped image, when cached), ``labels`` [n]

Images are cached in dataset order (classes sorted by name, files sorted). Every shard is written
to a temporary name and renamed, with its shard number and size in the metadata, so a killed run
re-encodes only the shards that are missing (``cache_latents`` on the same directory continues).
Under ``torchrun`` the shards are divided among the ranks.

Training reads a cache as a ``Dataset`` (``--data latents:DIR``) with the augmentation semantics
of the pixel pipeline: the same ADM center crop happened before encoding, and the random
horizontal flip picks ``mean_flip`` instead of ``mean`` (a cache without flips trains without),
and every batch draws a fresh latent mean + std * eps from the posterior, as MAR does with its
cached moments (seeded per sample from the training generator, so resume and any number of
processes see the same latents). ``EncodedDataset`` does the same on the fly, without a cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from .progress import progress_bar

from .autoencoders import (LATENT_KEYS, Autoencoder, AutoencoderError, autoencoder_from_spec, check_same_autoencoder,
                           load_autoencoder, resolve_weights, sample_posterior, weights_digest)
from .data import Dataset, load_dataset
from .devices import barrier as process_barrier, finalize_distributed, init_distributed
from .files import NewFiles, atomic_path, check_dir_path, write_json

FORMAT = "causalfusion-latent-cache"
VERSION = 1
INDEX = "index.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Settings that must match for a cache to be continued.
_SAME = ("format", "version", "source", "fingerprint", "num_images", "image_size", "image_channels",
         "flip", "posterior", "dtype", "shard_size")


class CacheError(ValueError):
    """A latent cache that is missing, incomplete, or does not fit the run."""


def dataset_fingerprint(ds: Dataset) -> str:
    """Identifies the images of a dataset: file names and sizes (folders) or the pixels (in memory)."""
    h = hashlib.sha256()
    h.update(ds.name.encode())
    if ds.paths is not None:
        for p in ds.paths:
            h.update(f"{p}\0{p.stat().st_size}\0".encode())
    elif ds.images is not None:
        h.update(ds.images.float().numpy().tobytes())
    h.update(ds.labels.numpy().tobytes())
    return h.hexdigest()


def cache_id(index: dict) -> str:
    """What every shard of a cache is stamped with: its settings, images and autoencoder, hashed
    (a shard copied in from another cache is refused by it, even with the same shape)."""
    ae = index.get("autoencoder") or {}
    ident = {**{k: index.get(k) for k in _SAME + ("latent_shape",)},
             "autoencoder": {k: ae[k] for k in LATENT_KEYS if ae.get(k) is not None}}  # not its path
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _shard_problem(f, i: int, index: dict) -> str | None:
    """Why the open shard ``f`` is not shard ``i`` of the cache ``index`` (None: it is)."""
    s, meta, keys = index["shards"][i], f.metadata() or {}, set(f.keys())
    need = {"mean", "labels"} | ({"mean_flip"} if index["flip"] else set())
    need |= {k.replace("mean", "std") for k in need if k.startswith("mean")} if index.get("posterior") else set()
    if meta.get("shard") != str(i) or meta.get("count") != str(s["count"]):
        return f"it is shard {meta.get('shard')} of {meta.get('count')} images, not shard {i} of {s['count']}"
    if "cache" in meta and meta["cache"] != cache_id(index):  # (shards written before the stamp have none)
        return "it belongs to another cache (other images, settings or autoencoder)"
    if not need <= keys:
        return f"it lacks {', '.join(sorted(need - keys))}"
    shape = [s["count"], *index["latent_shape"]]
    for key in sorted(need):
        have = list(f.get_slice(key).get_shape())
        if have != (shape[:1] if key == "labels" else shape):
            return f"its {key} is {have}, not {shape[:1] if key == 'labels' else shape}"
    return None


def _shard_ok(path: Path, i: int, index: dict) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return _shard_problem(f, i, index) is None
    except Exception:  # a damaged file is simply encoded again
        return False


def plan_shards(num_images: int, shard_size: int) -> list[dict]:
    return [{"file": f"shard_{i:05d}.safetensors", "start": s, "count": min(shard_size, num_images - s)}
            for i, s in enumerate(range(0, num_images, shard_size))]


@torch.no_grad()
def cache_latents(dataset: Dataset, out: str | Path, ae: Autoencoder, *, flip: bool = True, shard_size: int = 2048,
                  batch_size: int = 64, dtype: str = "float32", progress: bool = True,
                  rank: int = 0, world: int = 1, barrier=None, posterior: bool = True) -> dict:
    """Encode ``dataset`` into ``out`` (or finish a cache started there). Returns the index.

    ``posterior`` (with a VAE) also stores the posterior std, so training samples latents.

    ``rank``/``world`` split the shards among processes (``barrier`` synchronises them).
    """
    if dtype not in DTYPES:
        raise CacheError(f"unknown latent dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if shard_size < 1 or batch_size < 1:
        raise CacheError("shard size and batch size must be >= 1")
    if dataset.channels != ae.image_channels:
        raise CacheError(f"{dataset.name} has {dataset.channels}-channel images; the {ae.kind} autoencoder takes {ae.image_channels}")
    out = Path(out)
    latent = ae.latent_size(dataset.image_size)
    posterior = bool(posterior and ae.has_posterior)
    index = {
        "format": FORMAT, "version": VERSION, "source": dataset.name, "fingerprint": dataset_fingerprint(dataset),
        "num_images": len(dataset), "num_classes": dataset.num_classes, "classes": dataset.classes,
        "image_size": dataset.image_size, "image_channels": dataset.channels, "autoencoder": ae.spec(),
        "latent_shape": [ae.channels, latent, latent], "flip": bool(flip), "posterior": posterior, "dtype": dtype,
        "shard_size": shard_size, "shards": plan_shards(len(dataset), shard_size), "complete": False,
    }
    check_dir_path(out)
    path = out / INDEX
    if not path.exists() and out.is_dir() and any(out.iterdir()):
        # e.g. a training run: index.json and the shards went in among its files
        raise CacheError(f"--out {out} is a non-empty directory without a latent cache ({INDEX}); "
                         f"give a new or empty directory, or an existing cache to continue")
    if barrier:
        barrier()  # every rank has looked at ``out`` before rank 0 writes the index into it
    # what to take back if the first shard fails (a cache started earlier, or by another rank, is kept)
    new_files = NewFiles(out) if world == 1 and not path.exists() else None
    if path.exists():
        old = _read_index(out)
        for key in _SAME:
            if old.get(key) != index[key]:
                a, b = old.get(key), index[key]
                if key == "fingerprint":
                    key, a, b = "images (file list)", str(a)[:12], str(b)[:12]
                raise CacheError(f"{out} holds a latent cache made with other settings ({key}: {a} vs {b}); "
                                 f"choose another --out or delete it")
        try:
            check_same_autoencoder(old.get("autoencoder"), index["autoencoder"], "cached", "requested")
        except AutoencoderError as e:
            raise CacheError(f"{out} holds a latent cache made with other settings: {e}") from None
        intact = all(_shard_ok(out / s["file"], i, index) for i, s in enumerate(index["shards"]))
        if old.get("complete") and intact:
            return old  # (a finished cache with a deleted or damaged shard is repaired below)
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, index)
    if barrier:
        barrier()

    shards = index["shards"]
    mine = [i for i in range(len(shards)) if i % world == rank]
    todo = [i for i in mine if not _shard_ok(out / shards[i]["file"], i, index)]
    done_images = sum(shards[i]["count"] for i in mine if i not in todo)
    bar = progress_bar(total=sum(shards[i]["count"] for i in mine), initial=done_images, desc="caching latents",
               disable=not progress or rank != 0, unit="img", dynamic_ncols=True)
    try:
        for i in todo:
            _encode_shard(dataset, ae, out, i, index, dtype, batch_size, bar)
    except BaseException:  # e.g. a damaged image: a cache this call started and never filled is removed
        if new_files is not None and not any((out / s["file"]).exists() for s in shards):
            new_files.remove()
        raise
    bar.close()
    if barrier:
        barrier()
    if rank == 0:
        missing = [s["file"] for i, s in enumerate(shards) if not _shard_ok(out / s["file"], i, index)]
        if missing:
            raise CacheError(f"{len(missing)} shards still missing in {out} (e.g. {missing[0]}); run cache-latents again")
        index["complete"] = True
        write_json(path, index)
    if barrier:
        barrier()
    return index


def _encode_shard(dataset: Dataset, ae: Autoencoder, out: Path, i: int, index: dict, dtype: str, batch_size: int,
                  bar) -> None:
    """Encode the images of shard ``i`` (and their flips) and write its safetensors file."""
    s, flip, posterior = index["shards"][i], index["flip"], index["posterior"]
    parts: dict[str, list[torch.Tensor]] = {}
    for b0 in range(s["start"], s["start"] + s["count"], batch_size):
        idx = torch.arange(b0, min(b0 + batch_size, s["start"] + s["count"]))
        x = dataset.get(idx)
        for suffix, view in [("", x)] + ([("_flip", x.flip(-1))] if flip else []):
            mean, std = ae.encode_posterior(view)
            parts.setdefault("mean" + suffix, []).append(mean)
            if posterior:
                parts.setdefault("std" + suffix, []).append(std)
        bar.update(len(idx))
    tensors = {k: torch.cat(v).to(DTYPES[dtype]).contiguous() for k, v in parts.items()}
    tensors["labels"] = dataset.labels[s["start"]:s["start"] + s["count"]].clone()
    with atomic_path(out / s["file"]) as tmp:
        save_file(tensors, str(tmp), metadata={"shard": str(i), "count": str(s["count"]), "start": str(s["start"]),
                                                "cache": cache_id(index)})
        _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted. safetensors writes the metadata
    from a Rust HashMap, in an order that changes from call to call, so the same shard would be
    other bytes (another sha256) every time; the header keeps its length and the tensors stay put."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        # ensure_ascii=False: safetensors (serde_json) writes non-ASCII as UTF-8, not as \u escapes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # the same JSON in another order: never longer
            raise RuntimeError(f"{path}: rewritten safetensors header is {len(text)} bytes, not {size}")
        f.seek(8)
        f.write(text.ljust(size))


def _read_index(root: Path) -> dict:
    path = root / INDEX
    if not path.is_file():
        raise CacheError(f"{root} is not a latent cache ({INDEX} not found); make one with `causalfusion cache-latents`")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is corrupt ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CacheError(f"{path} is not a causalfusion latent cache index")
    return index


class LatentDataset(Dataset):
    """A finished latent cache as a training ``Dataset``: image_size/channels are the latent's."""

    def __init__(self, root: str | Path, index: dict):
        c, h, _ = index["latent_shape"]
        self.root, self.index = Path(root), index
        self._handles: dict[int, object] = {}
        labels = []
        for i in range(len(index["shards"])):
            problem = _shard_problem(self._handle(i), i, index)
            if problem:
                raise CacheError(f"latent cache shard {self.root / index['shards'][i]['file']} does not fit {INDEX}: "
                                 f"{problem}; delete it and run cache-latents again")
            labels.append(self._handle(i).get_tensor("labels"))
        super().__init__(name=f"latents:{self.root}", num_classes=index["num_classes"], image_size=h, channels=c,
                         labels=torch.cat(labels).long(), classes=index.get("classes"), flip=bool(index["flip"]),
                         posterior=bool(index.get("posterior", False)))  # caches written before std was stored: means
        self.autoencoder = {**index["autoencoder"], "image_size": index["image_size"]}

    def _handle(self, shard: int):
        if shard not in self._handles:
            path = self.root / self.index["shards"][shard]["file"]
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises several error types for damaged files
                raise CacheError(f"latent cache shard {path} is unreadable ({type(e).__name__}: {e}); "
                                 f"delete it and run cache-latents again") from None
        return self._handles[shard]

    def get(self, index: torch.Tensor, flip: torch.Tensor | None = None, seeds: torch.Tensor | None = None) -> torch.Tensor:
        c, h, w = self.index["latent_shape"]
        draw = self.posterior and seeds is not None
        mean, std = torch.empty(len(index), c, h, w), torch.empty(len(index), c, h, w) if draw else None
        size = self.index["shard_size"]
        for row, i in enumerate(index.tolist()):
            shard, off = divmod(i, size)
            key = "mean_flip" if flip is not None and bool(flip[row]) else "mean"
            mean[row] = self._handle(shard).get_slice(key)[off:off + 1][0].float()
            if draw:
                std[row] = self._handle(shard).get_slice(key.replace("mean", "std"))[off:off + 1][0].float()
        bad = ~torch.isfinite(mean).flatten(1).all(1)
        if draw:
            bad |= ~torch.isfinite(std).flatten(1).all(1)
        if bad.any():  # a damaged shard: training would stop at a NaN loss and blame itself
            row = int(bad.nonzero()[0])
            key = "mean_flip" if flip is not None and bool(flip[row]) else "mean"
            path = self.root / self.index["shards"][int(index[row]) // size]["file"]
            raise CacheError(f"latent cache shard {path} holds non-finite values (NaN or inf in tensor {key!r} "
                             f"or its std); delete it and run cache-latents again")
        return sample_posterior(mean, std, seeds) if draw else mean

    def __getstate__(self):  # safe_open handles do not pickle; reopen lazily
        return {**self.__dict__, "_handles": {}}


def open_latent_cache(root: str | Path, autoencoder: dict | None = None, image_size: int | None = None) -> LatentDataset:
    """Open a finished cache; refuse (one line) if it was made with another autoencoder or image size."""
    root = Path(root)
    if not root.is_dir():
        raise CacheError(f"latent cache {root} does not exist")
    index = _read_index(root)
    if not index.get("complete"):
        raise CacheError(f"latent cache {root} is incomplete; run `causalfusion cache-latents` with the same arguments to finish it")
    if image_size is not None and image_size != index["image_size"]:
        raise CacheError(f"latent cache {root} holds {index['image_size']}px images encoded, not --image-size {image_size}")
    if autoencoder is not None:
        try:
            check_same_autoencoder(index["autoencoder"], autoencoder, "cached", "requested")
        except AutoencoderError as e:
            raise CacheError(f"latent cache {root}: {e}") from None
    return LatentDataset(root, index)


class EncodedDataset(Dataset):
    """A pixel dataset seen through an autoencoder, encoded batch by batch (no cache)."""

    def __init__(self, base: Dataset, ae: Autoencoder):
        if base.channels != ae.image_channels:
            raise AutoencoderError(f"{base.name} has {base.channels}-channel images; the {ae.kind} autoencoder takes {ae.image_channels}")
        size = ae.latent_size(base.image_size)
        super().__init__(name=base.name, num_classes=base.num_classes, image_size=size, channels=ae.channels,
                         labels=base.labels, classes=base.classes, flip=base.flip, posterior=ae.has_posterior)
        self.base, self.ae = base, ae
        self.autoencoder = {**ae.spec(), "image_size": base.image_size}

    def get(self, index: torch.Tensor, flip: torch.Tensor | None = None, seeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.base.get(index, flip)
        if seeds is None or not self.posterior:
            return self.ae.encode(x)
        return sample_posterior(*self.ae.encode_posterior(x), seeds)


def cache_dataset(data: str, out: str | Path, *, image_size: int | None = None, vae: str | None = None,
                  vae_path: str | None = None, channels: int = 3, flip: bool = True,
                  shard_size: int = 2048, batch_size: int = 64, dtype: str = "float32", device: str = "cpu",
                  progress: bool = True, posterior: bool = True) -> dict | None:
    """``causalfusion cache-latents``: load the data and the VAE, encode (shards divided among the
    ranks under torchrun). Returns the finished index on rank 0, None on the other ranks."""
    if data.startswith("latents:"):
        raise CacheError("--data is already a latent cache")
    check_dir_path(out)  # before the data and the VAE load (cache_latents checks it again, for Python callers)
    ds = load_dataset(data, image_size, channels)
    env = init_distributed(device)
    ae = load_autoencoder(vae or "identity", vae_path, channels=ds.channels, device=device)
    index = cache_latents(ds, out, ae, flip=flip and ds.flip, shard_size=shard_size, batch_size=batch_size,
                          dtype=dtype, progress=progress, rank=env.rank, world=env.world, posterior=posterior,
                          barrier=process_barrier if env.world > 1 else None)
    finalize_distributed()
    return index if env.is_main else None


def training_dataset(data: str, image_size: int | None = None, *, vae: str | None = None, vae_path: str | None = None,
                     saved_autoencoder: dict | None = None, channels: int = 3, device: str = "cpu") -> Dataset:
    """The training ``Dataset`` in its latent space: pixels, a folder encoded on the fly by ``vae``,
    or a ``latents:DIR`` cache. ``saved_autoencoder``: the spec a resumed run was started with (its
    VAE is reloaded when ``vae`` is not given). Refuses (one line) a cache or a VAE that differs
    from the one the run was started with."""
    if data.startswith("latents:"):
        ds = open_latent_cache(data[len("latents:"):], image_size=image_size)
        if vae is not None:
            want = {"kind": vae}
            if vae_path is not None and vae != "identity":
                want["weights_sha256"] = weights_digest(resolve_weights(vae_path, vae))
            check_same_autoencoder(ds.autoencoder, want, "cached", "--vae")
    elif vae not in (None, "identity") or (vae is None and saved_autoencoder and saved_autoencoder.get("kind") != "identity"):
        base = load_dataset(data, image_size, channels)
        if vae is None:
            ae = autoencoder_from_spec(saved_autoencoder, vae_path, device=device)
        else:
            ae = load_autoencoder(vae, vae_path, device=device)
        ds = EncodedDataset(base, ae)
    else:
        ds = load_dataset(data, image_size, channels)
    if saved_autoencoder is not None:
        check_same_autoencoder(saved_autoencoder, getattr(ds, "autoencoder", None), "run's", "given data's")
    return ds
