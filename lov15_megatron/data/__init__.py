"""Data: tokenizer, chat template, image processing, raw readers, offline packing, task encoder.

One implementation of each rule, shared by the packer (``tools/pack_offline.py``), training and
the model side: special tokens (:mod:`.special_tokens`), tokenizer (:mod:`.tokenizer`), image
preprocessing (:mod:`.image_processing`), chat template and labels (:mod:`.chat`), sample
lengths (:mod:`.measure`), packing (:mod:`.packing`, :mod:`.offline_packing`) and the Energon
side (:mod:`.energon_dataset`, :mod:`.task_encoder`, :mod:`.loader`). See
``docs/data-packing.md``.
"""
