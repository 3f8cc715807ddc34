//! Lua scripts run by their digest, `EVALSHA`, and on a Redis that does not hold them yet
//! (`NOSCRIPT`: a new or restarted Redis, its script cache flushed) by their text, `EVAL`, which
//! also keeps them there: two round trips at most. The redis crate's `Script::invoke_async`
//! makes three there (`EVALSHA`, `SCRIPT LOAD`, `EVALSHA`), and the writer of the charges, whose
//! first call (its marker's making, a connection made with it) waits [`super::WRITE_WAIT`],
//! would not get the answer of a Redis 1.4 s a round trip away in time.

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisResult, ServerErrorKind, ToRedisArgs};

/// A script, with its SHA-1 digest.
#[derive(Debug)]
pub(super) struct Script {
    code: &'static str,
    sha: String,
}

impl Script {
    pub(super) fn new(code: &'static str) -> Self {
        let sha = redis::Script::new(code).get_hash().to_owned();
        Self { code, sha }
    }

    /// A call with `key` as its first key.
    pub(super) fn key(&self, key: impl ToRedisArgs) -> Invocation<'_> {
        let mut call = self.prepare_invoke();
        call.key(key);
        call
    }

    /// A call without keys or arguments yet.
    pub(super) fn prepare_invoke(&self) -> Invocation<'_> {
        Invocation {
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// One call of a [`Script`]: its keys and arguments.
pub(super) struct Invocation<'a> {
    script: &'a Script,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl Invocation<'_> {
    pub(super) fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    pub(super) fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// `EVALSHA`, then `EVAL` when Redis does not hold the script.
    pub(super) async fn invoke_async<T: FromRedisValue>(
        &self,
        conn: &mut impl ConnectionLike,
    ) -> RedisResult<T> {
        match self
            .command("EVALSHA", &self.script.sha)
            .query_async(conn)
            .await
        {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.command("EVAL", self.script.code)
                    .query_async(conn)
                    .await
            }
            answered => answered,
        }
    }

    fn command(&self, verb: &str, script: &str) -> Cmd {
        let mut cmd = redis::cmd(verb);
        cmd.arg(script)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::{RedisFuture, Value};

    /// A Redis that holds the scripts it was sent with `EVAL`, answering each with the number of
    /// keys, the keys and the arguments it got (`refusing`: every command out of memory); the
    /// commands it was sent, in order.
    #[derive(Default)]
    struct Recorder {
        held: Vec<Vec<u8>>,
        sent: Vec<Vec<Vec<u8>>>,
        refusing: bool,
    }

    impl ConnectionLike for Recorder {
        fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
            let args: Vec<Vec<u8>> = cmd
                .args_iter()
                .map(|a| match a {
                    redis::Arg::Simple(b) => b.to_vec(),
                    _ => Vec::new(),
                })
                .collect();
            self.sent.push(args.clone());
            let verb = String::from_utf8_lossy(&args[0]).to_uppercase();
            let answer = match verb.as_str() {
                _ if self.refusing => redis::parse_redis_value(b"-OOM command not allowed\r\n")
                    .expect("an error reply"),
                "EVALSHA" if !self.held.contains(&args[1]) => {
                    redis::parse_redis_value(b"-NOSCRIPT No matching script.\r\n")
                        .expect("an error reply")
                }
                "EVALSHA" => {
                    Value::Array(args[2..].iter().cloned().map(Value::BulkString).collect())
                }
                "EVAL" => {
                    let sha = redis::Script::new(&String::from_utf8_lossy(&args[1]))
                        .get_hash()
                        .as_bytes()
                        .to_vec();
                    self.held.push(sha);
                    Value::Array(args[2..].iter().cloned().map(Value::BulkString).collect())
                }
                _ => Value::Okay,
            };
            Box::pin(async move { Ok(answer) })
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            _: &'a redis::Pipeline,
            _: usize,
            _: usize,
        ) -> RedisFuture<'a, Vec<Value>> {
            Box::pin(async { Ok(Vec::new()) })
        }

        fn get_db(&self) -> i64 {
            0
        }
    }

    fn verbs(r: &Recorder) -> Vec<String> {
        r.sent
            .iter()
            .map(|c| String::from_utf8_lossy(&c[0]).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_script_redis_does_not_hold_costs_two_round_trips_then_one() {
        let script = Script::new("return {KEYS[1], KEYS[2], ARGV[1]}");
        let mut redis = Recorder::default();
        let mut call = script.key("k1");
        call.key("k2").arg(7u64);
        let got: Vec<String> = call.invoke_async(&mut redis).await.expect("answered");
        assert_eq!(
            got,
            ["2", "k1", "k2", "7"],
            "the number of keys, the keys, the arguments"
        );
        assert_eq!(
            verbs(&redis),
            ["EVALSHA", "EVAL"],
            "not SCRIPT LOAD then EVALSHA again"
        );
        assert_eq!(redis.sent[1][1], script.code.as_bytes());
        let got: Vec<String> = call.invoke_async(&mut redis).await.expect("answered");
        assert_eq!(got, ["2", "k1", "k2", "7"]);
        assert_eq!(
            verbs(&redis)[2..],
            ["EVALSHA"],
            "held since: one round trip"
        );
        assert_eq!(redis.sent[2][1], script.sha.as_bytes());
    }

    #[tokio::test]
    async fn errors_other_than_noscript_are_answered_as_they_are() {
        let mut redis = Recorder {
            refusing: true,
            ..Recorder::default()
        };
        let got: RedisResult<i64> = Script::new("return 1")
            .prepare_invoke()
            .invoke_async(&mut redis)
            .await;
        assert_eq!(got.expect_err("refused").code(), Some("OOM"));
        assert_eq!(verbs(&redis), ["EVALSHA"], "not sent again");
    }
}
