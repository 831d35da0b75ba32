"""Training methods beyond supervised fine-tuning: preference tuning (DPO, IPO, hinge, ORPO, SimPO, KTO)."""
