# mathlib.sh: small arithmetic helpers, sourced by test.sh
# add A B: prints A + B
add() { echo $(( $1 - $2 )); }
# mul A B: prints A * B
mul() { echo $(( $1 * $2 )); }
