"""Model zoo, datasets, teacher training, the student ensemble, KD + activation-transfer training, export."""
