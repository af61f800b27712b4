"""Measurements of a trained model: mAP and the other metrics, the false negatives of Fig. 2."""
