"""Evaluation: the paper's DreamBench and MS-COCO FID protocols, and the same metrics on any folder of images.

:mod:`.protocols` holds the protocols as data (subjects, reference images, prompts and rewrites, caption
sampling), :mod:`.metrics` the scores (DINO, CLIP-I, CLIP-T, FID) and tables, :mod:`.inception` the FID
Inception-V3 in plain torch, :mod:`.runner` the resumable, multi-process generation and scoring that
``kosmos-g eval`` runs. See ``docs/evaluation.md``.
"""
