"""The three jobs, each a short function: compose config -> instantiate -> run -> write outputs."""
