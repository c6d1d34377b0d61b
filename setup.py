"""amos_jax: encoder pretraining (AMOS, ELECTRA, MLM) and embedding training in JAX/Flax."""
from setuptools import find_packages, setup

# Pinned: a fresh machine installs exactly the set the test suite ran against.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "sentencepiece==0.2.3",
    # WordPiece vocab.txt of imported BERT-family checkpoints.
    "tokenizers==0.23.3",
    # Catalogued corpora and the local-text builder (array_record path; no TensorFlow).
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "array-record==0.8.6",
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "tensorboardX==2.6.5",
    # gs:// workdirs and data through etils.epath's fsspec backend (no TensorFlow).
    "etils==1.15.0",
    "gcsfs==2026.10.1",
    "tqdm==4.70.1",
    # Ships the embedded demo corpus (a Wikipedia sample and news articles).
    "gensim==4.4.0",
    # amos-eval: rank correlations, grid heatmaps; amos-index: Milvus (Lite by default).
    "scipy==1.17.1",
    "matplotlib==3.11.2",
    "pymilvus==3.0.2",
    "milvus-lite==3.2.2",
]

EXTRAS = {
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        # TPU topologies on a CPU-only machine, for ahead-of-time compiles of pod
        # steps; the version jax==0.10.2's own `tpu` extra asks for.
        "libtpu==0.0.42.1",
        # Hugging Face parity tests (PyTorch CPU; the Makefile installs torch first).
        "torch==2.13.0",
        "transformers==5.23.0",
        "sentence-transformers==6.2.0",
        # Reference implementation of the retrieval metrics.
        "ranx==0.3.21",
        # A local Cloud Storage server for the gs:// tests (tests/gcs_emulator.py).
        "gcp-storage-emulator==2026.7.19",
    ],
}

setup(
    name="amos_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["amos_jax", "amos_jax.*"]),
    # The BLAS attention products' source, compiled on first use (model/cpu_matmul.py).
    package_data={"amos_jax.model": ["native/*.cc", "native/*.h"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "amos-train=amos_jax.cli:train_main",
            "amos-prepare=amos_jax.cli:prepare_main",
            "amos-export=amos_jax.cli:export_main",
            "amos-bench=amos_jax.cli:bench_main",
            "amos-eval=amos_jax.eval.cli:eval_main",
            "amos-index=amos_jax.eval.cli:index_main",
        ],
    },
)
