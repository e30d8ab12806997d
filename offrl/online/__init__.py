"""Online RL baselines (SAC, DQN, PPO) that share offrl's networks, policy artefacts and evaluation.

``offrl online --algo {sac,dqn,ppo} --env ENV_ID --steps N --out RUN_DIR`` or
:func:`offrl.online.loop.train_online`; see docs/online.md.
"""
