"""Other frameworks' models with moeflow's MoE layers inside, and their checkpoint layouts.

- `megatron_core`: moeflow's MoE layer in megatron-core's `mlp` slot (layer specs, GPTModel,
  expert and tensor parallelism over megatron's parallel_state);
- `megatron_ckpt`: weights both ways between moeflow and megatron-core's MoE checkpoints.

The engines that train with them are `moeflow.launch.engines`; frameworks are imported lazily.
"""
