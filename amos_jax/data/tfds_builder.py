"""A tensorflow-datasets builder for local text, so a corpus registers as a tfds dataset.

  register_text_corpus("mycorpus", ["a.txt", "b.jsonl"], data_dir="~/tfds")
  tfds.data_source("amos_text/mycorpus", split="train", data_dir="~/tfds")
  amos-prepare --input tfds:amos_text/mycorpus:train --tfds-data-dir ~/tfds ...

Written in the array_record format and read back with `tfds.data_source`, which
works without TensorFlow (tfrecord and `as_dataset` would need it).
"""
from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds
from etils import epath

from amos_jax.data import corpus
from amos_jax.errors import ConfigError


@dataclasses.dataclass
class AmosTextConfig(tfds.core.BuilderConfig):
  files: tuple[str, ...] = ()
  doc_sep: str = "line"
  text_field: str = "text"


class AmosText(tfds.core.GeneratorBasedBuilder):
  """One `text` feature per document; one config per registered corpus."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [AmosTextConfig(name="default")]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds finds a packaged builder's files through `importlib_resources`, which it
    # does not install; this builder has no checksum or metadata files anyway.
    return epath.Path(__file__)

  def _info(self):
    # DatasetInfo directly: the metadata-file lookup of dataset_info_from_configs
    # expects a dataset package directory.
    return tfds.core.DatasetInfo(
        builder=self, description="Local text registered by amos-prepare.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    docs = corpus.iter_documents(list(cfg.files), doc_sep=cfg.doc_sep,
                                 text_field=cfg.text_field)
    for i, doc in enumerate(docs):
      yield i, {"text": doc}


def register_text_corpus(name: str, files: list[str], data_dir: str | None,
                         doc_sep: str = "line", text_field: str = "text") -> str:
  """Builds amos_text/<name> (split 'train') under data_dir; returns its tfds name."""
  if not data_dir:
    raise ConfigError("--tfds-data-dir is required to register a tfds dataset")
  config = AmosTextConfig(name=name, files=tuple(os.path.abspath(f) for f in files),
                          doc_sep=doc_sep, text_field=text_field)
  builder = AmosText(config=config, data_dir=os.path.expanduser(data_dir),
                     file_format="array_record")
  builder.download_and_prepare()
  return f"amos_text/{name}"
