"""Experiment drivers built on the library, not part of it: MoEfication of a dense model into a real
transformers MoE (:mod:`.moefy`, our MoE evaluation model) and the MoE comparison behind
``torchao-mx moe-compare`` (:mod:`.moe_compare`)."""
