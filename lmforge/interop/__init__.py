"""Interoperability with other ecosystems: Hugging Face model folders (see :mod:`.hf`)."""

from .hf import is_hf_folder, load_hf_model, load_hf_tokenizer, save_hf

__all__ = ["is_hf_folder", "load_hf_model", "load_hf_tokenizer", "save_hf"]
