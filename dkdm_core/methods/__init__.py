"""Distillation methods beyond DKDM's single student: O2MKD's timestep router and BOOT's one-step student."""
