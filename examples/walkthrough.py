# %% [markdown]
# # mriface walk-through: from a head scan to a re-identification rank
#
# Each cell runs one stage of the study on the built-in sample data, so you
# can see what every stage produces. Run it top to bottom as a script
# (`.venv/bin/python examples/walkthrough.py`) or cell by cell in an editor
# that understands `# %%` cells (VS Code, Spyder, Jupyter with jupytext).
# It uses the two population-average heads (pydeface's template and
# voxface's ConteCore2 average), small renders and few views, so it takes
# about a minute on a laptop CPU. Outputs go to `mriface-demo/walkthrough/`.

# %%
from pathlib import Path

import mriface
from mriface import datasets

OUT = Path("mriface-demo/walkthrough")
OUT.mkdir(parents=True, exist_ok=True)
HEADS = ["pydeface", "voxface"]  # averaged heads: fine to look at
paths = {h: datasets.sample_head(h) for h in HEADS}  # fetched once, then cached
print(mriface.__version__, {h: p.name for h, p in paths.items()})

# %% [markdown]
# ## 1. Load: scan file -> Volume (RAS+, millimetres)

# %%
volumes = {h: mriface.load_volume(p) for h, p in paths.items()}
for h, v in volumes.items():
    print(f"{h:9s} shape {v.shape}  voxel {v.zooms.round(2)} mm  modality {v.modality}")

# %% [markdown]
# ## 2. Surface: Volume -> HeadSurface with its face frame
#
# The skin is an iso-surface of the smoothed intensities; the face frame
# (centre, `forward` out of the face, `up`) is found from the geometry, so
# tilted heads still get frontal cameras.

# %%
surfaces = {h: mriface.extract_head_surface(v, device="cpu") for h, v in volumes.items()}
for h, s in surfaces.items():
    print(f"{h:9s} {s.n_verts:7d} vertices {s.n_faces:7d} triangles  forward {s.frame.forward.round(2)}")

# %% [markdown]
# ## 3. Render: surfaces -> photo-like images
#
# `RenderProtocol` draws each view's camera, light and skin from ranges; a
# subject's draws depend only on the seed and its id.

# %%
from mriface.render import RenderProtocol, render_views, write_renders

gallery_protocol = RenderProtocol(views=4, image_size=256, seed=0)
probe_protocol = RenderProtocol(views=4, image_size=256, seed=1)  # other views, lights, skin
gallery = render_views(surfaces, gallery_protocol, device="cpu")
probes = render_views(surfaces, probe_protocol, device="cpu")
print(gallery.images.shape, gallery.subjects)
print(gallery.to_dataframe()[["subject", "view", "azimuth_deg", "elevation_deg", "light_intensity"]])
written = write_renders(gallery, OUT / "renders")  # averaged heads only: no real person
print("wrote", len(written), "PNGs and renders.csv to", OUT / "renders")

# %% [markdown]
# ## 4. Recognise: images -> aligned faces -> 512-d embeddings
#
# A face model comes from the registry by name (`available_models()` lists
# them); it says which crop it needs, and MTCNN finds the face and cuts that
# crop: for FaceNet (CASIA-WebFace weights, converted offline on first use)
# a 160x160 box crop.

# %%
from mriface.recognition import FaceAligner, available_models, get_model

print("face models:", available_models())
embedder = get_model("facenet", device="cpu")
aligner = FaceAligner(device="cpu", min_face_size=32, crops=(embedder.crop,))  # renders: no tiny faces
g_al, p_al = aligner.align(gallery.images), aligner.align(probes.images)
print("faces found in gallery renders:", g_al.found.tolist())
g_emb, p_emb = embedder.embed(g_al), embedder.embed(p_al)  # NaN rows where no face
print(g_emb.shape, "row norms", g_emb.norm(dim=1).round(decimals=3).tolist())

# %% [markdown]
# ## 5. Match: rank every probe against the gallery
#
# The study's procedure: per probe the top-k gallery subjects with a
# confidence score, scores summed over a participant's probes, the rank of
# the participant's own subject.

# %%
import numpy as np

from mriface.match import run_matching

def by_subject(batch, emb):
    out = {}
    for sid, e in zip(batch.subjects, emb.numpy()):
        out.setdefault(sid, []).append(e if np.isfinite(e).all() else None)
    return out

gal = {s: np.array([e for e in es if e is not None]) for s, es in by_subject(gallery, g_emb).items()}
result = run_matching(gal, by_subject(probes, p_emb), k=50)
print(result.per_participant[["participant", "true_rank", "true_score", "top5_subjects"]])
print("rank 1:", result.summary["rank1"])

# %% [markdown]
# ## 6. The same, end to end, cached and reported: `run_study`
#
# `run_study` does all of the above for a manifest or BIDS dataset, caches
# every subject (a rerun is instant), counts failures, and writes the
# tables and an HTML report. Here: the gallery heads against rotated,
# resampled copies of themselves, as `mriface demo` does.

# %%
from mriface.demo import prepare_demo_inputs
from mriface.study import run_study

manifest = prepare_demo_inputs(OUT / "inputs", HEADS)
print(manifest.read_text())
study = run_study(manifest, out=OUT / "study", probes="scans", views=4, size=256, device="cpu")
print(study.table()[["participant", "true_rank", "true_score", "top5_subjects"]])
print({k: study.summary[k] for k in ("n", "n_gallery", "failures")})
print("report:", study.files["html"])

# %% [markdown]
# Run it again: every subject comes from the cache.

# %%
again = run_study(manifest, out=OUT / "study", probes="scans", views=4, size=256, device="cpu", progress=False)
print(f"computed {again.computed}, from cache {again.cached}")
assert again.computed == 0
