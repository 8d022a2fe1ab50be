"""Measuring recommendation quality: the dataset folders, their replay onto the topics, the
offline protocol of ../shared/EVAL.md (`evaluate`), the online evaluation through a running
stack (`online_eval`) and the embedding cache they share."""
