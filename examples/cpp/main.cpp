// keypool C++ example: a batch of 20, one ticket, one callback, and error handling.
//
//   cpp_main <base_url>
#include <chrono>
#include <cstdio>
#include <future>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "keypool.hpp"

int main(int argc, char **argv) {
    if (argc != 2) {
        std::cerr << "usage: " << argv[0] << " <base_url>\n";
        return 2;
    }
    const std::string base_url = argv[1];
    int failures = 0;
    try {
        keypool::Pool pool("{\"base_url\": \"" + base_url +
                           "\", \"strategy\": \"round_robin\", \"keys\": ["
                           "{\"key\": \"sk-test-a\", \"label\": \"acct-a\", \"max_concurrent\": 4},"
                           "{\"key\": \"sk-test-b\", \"label\": \"acct-b\", \"max_concurrent\": 4}]}");

        std::vector<std::string> bodies;
        for (int i = 0; i < 20; i++) {
            bodies.push_back("{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"cpp " +
                             std::to_string(i) + "\"}]}");
        }
        std::map<std::string, int> per_key;
        int ok = 0;
        for (const keypool::Result &r : pool.batch(bodies)) {
            if (r.ok() && r.http_status() == 200 && !r.body().empty()) ok++;
            else std::cerr << "result failed: " << r.error() << "\n";
            per_key[std::string(r.key_label())]++;
        }
        std::cout << "batch: " << ok << "/20 OK\n";

        // A stream, pulled on this thread: deltas as they arrive, then the outcome.
        keypool::Stream stream = pool.submit_stream(bodies[0]);
        std::string text;
        bool stream_ok = false;
        while (auto ev = stream.next()) {
            if (ev->is_chunk()) {
                text += ev->delta();
            } else {
                stream_ok = ev->status() == KEYPOOL_OK &&
                            ev->body().find("\"chat.completion\"") != std::string_view::npos;
            }
        }
        if (!stream_ok || text != "echo: cpp 0" || !stream.done()) {
            std::cerr << "stream failed: " << text << "\n";
            failures++;
        }
        std::cout << "stream: " << text << "\n";
        for (const auto &[label, n] : per_key) std::cout << "  " << label << ": " << n << "\n";
        if (ok != 20) failures++;

        keypool::Ticket t = pool.submit(bodies[0]);
        keypool::Result r = t.wait();
        std::cout << "submit: HTTP " << r.http_status() << " via " << r.key_label() << "\n";
        if (!r.ok()) failures++;

        // A cancelled request ends with KEYPOOL_CANCELLED; a second cancel is a no-op.
        keypool::Ticket slow = pool.submit(
            "{\"model\": \"m\", \"messages\": [], \"mock\": {\"delay_ms\": 30000}}");
        bool first = slow.cancel(), second = slow.cancel();
        keypool::Result cancelled = slow.wait();
        std::cout << "cancel: " << keypool_status_str(cancelled.status()) << "\n";
        if (!first || second || cancelled.status() != KEYPOOL_CANCELLED) failures++;

        std::promise<bool> done;
        pool.submit(bodies[1], [&done](keypool::Result res) { done.set_value(res.ok()); });
        auto fut = done.get_future();
        if (fut.wait_for(std::chrono::seconds(30)) != std::future_status::ready || !fut.get()) {
            std::cerr << "callback failed or timed out\n";
            failures++;
        }

        // Move-only handle: the moved-to pool works, the moved-from one throws.
        keypool::Pool moved = std::move(pool);
        if (moved.stats_json().find("acct-a") == std::string::npos) failures++;
        try {
            pool.submit(bodies[0]);
            failures++;
        } catch (const keypool::Error &e) {
            if (e.code() != KEYPOOL_INVALID_ARGUMENT) failures++;
        }

        moved.shutdown(std::chrono::seconds(10));
        try {
            moved.submit(bodies[0]);
            failures++;
        } catch (const keypool::Error &e) {
            if (e.code() != KEYPOOL_CLOSED) failures++;
        }
    } catch (const keypool::Error &e) {
        std::cerr << "keypool error " << e.code() << ": " << e.what() << "\n";
        return 1;
    }

    // Fallback models (the config's "fallback_models"): acme/x, which no key serves, is
    // served as acme/y, and the result says so; acme/y itself names no fallback.
    try {
        keypool::Pool pool("{\"base_url\": \"" + base_url +
                           "\", \"fallback_models\": {\"acme/x\": [\"acme/y\"]}, \"keys\": ["
                           "{\"key\": \"sk-test-y\", \"label\": \"acct-y\", \"models\": [\"acme/y\"]}]}");
        auto body = [](const std::string &model) {
            return "{\"model\": \"" + model + "\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}";
        };
        keypool::Result fell = pool.submit(body("acme/x")).wait();
        keypool::Result direct = pool.submit(body("acme/y")).wait();
        std::cout << "fallback: acme/x served as " << fell.fallback_model() << "\n";
        if (!fell.ok() || fell.fallback_model() != "acme/y" || !direct.ok() ||
            !direct.fallback_model().empty()) {
            std::cerr << "fallback failed: " << fell.error() << direct.error() << "\n";
            failures++;
        }
    } catch (const keypool::Error &e) {
        std::cerr << "fallback: keypool error " << e.code() << ": " << e.what() << "\n";
        failures++;
    }

    try {
        keypool::Pool bad("{\"keys\": []}");
        failures++;
    } catch (const keypool::Error &e) {
        std::cout << "bad config: " << e.what() << "\n";
        if (e.code() != KEYPOOL_CONFIG) failures++;
    }

    if (failures) {
        std::cerr << failures << " failure(s)\n";
        return 1;
    }
    std::cout << "cpp: all OK\n";
    return 0;
}
