//! The test harness: real `redis-server` processes on free ports.
