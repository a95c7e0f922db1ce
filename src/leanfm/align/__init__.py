"""Aligning a new modality encoder to a frozen pretrained one: CWCL and the CLIP baseline."""
