"""The handler contract as authors meet it: the settings model, load-time checks, declared events."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field, ValidationError

from worker import App
from worker.apps.contract import SettingsReader
from worker.errors import PluginError
from worker.plugins import check_class, instantiate


class LimitSettings(BaseModel):
    greeting: str = "hello"
    limit: int = Field(3, ge=1)


class WithSettings(App):
    settings_model = LimitSettings
    settings: LimitSettings

    async def execute_post_message_sent(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
        return None


class WithoutSettings(App):
    async def execute_post_message_sent(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
        return None


class TestSettingsModel:
    def test_settings_are_the_validated_model_with_typed_attributes(self) -> None:
        """self.settings.limit works, converted by the model, and is an instance of the declared model."""
        app = instantiate(WithSettings, "with-settings", {"limit": "5"})
        assert isinstance(app.settings, LimitSettings)
        assert app.settings.limit == 5
        assert app.settings.greeting == "hello"

    def test_the_model_is_read_only(self) -> None:
        """Assigning to a setting fails: every run shares the one instance."""
        app = instantiate(WithSettings, "with-settings", {})
        with pytest.raises(ValidationError):
            app.settings.limit = 9

    def test_mapping_access_keeps_working(self) -> None:
        """settings["limit"] and dict(settings), as before the model, give the same values."""
        app = instantiate(WithSettings, "with-settings", {"limit": 4})
        assert app.settings["limit"] == 4
        assert dict(app.settings) == {"greeting": "hello", "limit": 4}

    def test_the_apps_engine_reader_reads_the_model(self) -> None:
        """get_value_by_id over the model; an unknown id names the declared ones."""
        app = instantiate(WithSettings, "with-settings", {"limit": 2})
        reader = SettingsReader(app.settings)
        assert reader.get_value_by_id("limit") == 2
        with pytest.raises(KeyError, match=r"no setting 'colour'; this app has: greeting, limit"):
            reader.get_value_by_id("colour")

    def test_an_app_without_a_model_has_empty_settings(self) -> None:
        """No settings_model: an empty model, no attributes, nothing in the mapping."""
        app = instantiate(WithoutSettings, "without", {})
        assert dict(app.settings) == {}
        with pytest.raises(KeyError, match="this app has: none"):
            SettingsReader(app.settings).get_value_by_id("x")


class TestLoadChecks:
    def test_a_synchronous_execute_method_is_refused_with_the_fix(self) -> None:
        """`def execute_post_message_sent` (no async) stops start-up and says to add async."""

        class Sync(App):
            def execute_post_message_sent(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def, override]
                return None

        with pytest.raises(PluginError, match=r"Sync\.execute_post_message_sent is not async; write `async def execute_post_message_sent"):
            check_class(Sync, "sync")

    def test_a_synchronous_check_method_is_refused_too(self) -> None:
        """The check_ methods are awaited as well."""

        class SyncCheck(App):
            def check_post_message_sent(self, message, read, http):  # type: ignore[no-untyped-def, override]
                return True

            async def execute_post_message_sent(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
                return None

        with pytest.raises(PluginError, match=r"SyncCheck\.check_post_message_sent is not async"):
            check_class(SyncCheck, "sync-check")


class TestDeclaredEvents:
    def test_an_app_takes_the_events_whose_execute_method_it_defines(self) -> None:
        """Defining execute_post_message_updated alone: updates only, not sent messages."""

        class EditsOnly(App):
            async def execute_post_message_updated(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
                return None

        check_class(EditsOnly, "edits-only")
        assert EditsOnly.takes("chat.rocket.message.updated")
        assert not EditsOnly.takes("chat.rocket.message.sent")
        assert not EditsOnly.takes("chat.rocket.message.deleted")

    def test_event_types_narrows_what_an_app_takes(self) -> None:
        """event_types overrides the derived set."""

        class Narrowed(App):
            event_types = frozenset({"chat.rocket.message.sent"})

            async def execute_post_message_sent(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
                return None

            async def execute_post_message_updated(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
                return None

        check_class(Narrowed, "narrowed")
        assert Narrowed.takes("chat.rocket.message.sent")
        assert not Narrowed.takes("chat.rocket.message.updated")

    def test_a_declared_type_without_its_execute_method_is_refused(self) -> None:
        """event_types naming deletions with no execute_post_message_deleted stops start-up."""

        class Overclaims(App):
            event_types = frozenset({"chat.rocket.message.deleted"})

            async def execute_post_message_sent(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
                return None

        with pytest.raises(PluginError, match=r"event_types must be a set of the types whose execute_ method it defines"):
            check_class(Overclaims, "overclaims")
